"""The one shared runtime of every c360 service: server, settings, errors, auth, telemetry, db."""
