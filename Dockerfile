# syntax=docker/dockerfile:1
# One image for the five c360 services; the command picks the service:
#   python -m services.<identity|profile|enrichment|gate|gdpr>           serve it
#   python -m services.<name> migrate                                   run its migrations, exit
# Build: docker build -t c360:dev .        (docs/deploy.md)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/c360
WORKDIR /src
COPY pyproject.toml requirements.lock ./
COPY c360 ./c360
COPY services ./services
# A regular (not editable) install: the runtime stage needs only the virtual environment.
RUN /opt/c360/bin/pip install -c requirements.lock .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="c360" \
      org.opencontainers.image.description="Customer 360 gRPC services: identity, profile, enrichment, gate, gdpr"
RUN groupadd --system --gid 10001 c360 \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/c360 \
      --shell /usr/sbin/nologin c360
COPY --from=build /opt/c360 /opt/c360
ENV PATH=/opt/c360/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Writable for a plain `docker run` on embedded SQLite (./data); Kubernetes runs the image with a
# read-only root filesystem, DATABASE_URL set and an emptyDir at /tmp.
WORKDIR /home/c360
USER 10001:10001
# gRPC: identity, profile, enrichment, gate, gdpr; HTTP: profile's Shopify webhooks.
EXPOSE 50051 50052 50053 50054 50055 8080
# Exec form, no shell; Kubernetes sets the command per Deployment. Health is checked with native
# gRPC probes, so the image needs no HEALTHCHECK or probe binary.
CMD ["python", "-m", "services.identity"]
