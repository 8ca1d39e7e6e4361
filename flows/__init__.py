"""Prefect flows that orchestrate the DVC stages (DVC owns caching, Prefect owns orchestration)."""

import os

# Loopback by default for every server Prefect may start from these processes: the temporary local
# API server, a served deployment's runner webserver, a worker's health-check webserver (whose own
# default is 0.0.0.0). Set the variable yourself to expose one (README: "Exposing a server").
for _key in ("PREFECT_SERVER_API_HOST", "PREFECT_RUNNER_SERVER_HOST", "PREFECT_WORKER_WEBSERVER_HOST"):
    os.environ.setdefault(_key, "127.0.0.1")
