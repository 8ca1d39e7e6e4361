"""Loopback by default: every server the project starts or documents binds 127.0.0.1 unless the
user says otherwise, and the docs say how to expose one safely."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from support.helpers import REPO, env

SERVER_COMMANDS = ("mlflow server", "mlflow ui", "mlflow models serve", "prefect server start")


def _commands(text: str) -> list[str]:
    """Shell lines with their backslash continuations joined."""
    return [ln.strip() for ln in re.sub(r"\\\n\s*", " ", text).splitlines()]


def _documentation() -> str:
    """README and the docs pages: every place a user copies a command from."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return "\n".join(p.read_text() for p in pages)


def test_documented_and_make_servers_bind_loopback():
    docs = _documentation()
    makefile = (REPO / "Makefile").read_text()
    # commands, not prose: the shell blocks of every page (a block's info string says what it holds)
    blocks = "\n".join(body for info, body in re.findall(r"```(\w*)\n(.*?)```", docs, re.S)
                       if info in ("", "bash", "sh"))
    started = [ln for ln in _commands(blocks) + _commands(makefile) if any(cmd in ln for cmd in SERVER_COMMANDS)]
    assert started, "no server commands found: the check would pass vacuously"
    for line in started:
        if "prefect server start" in line:
            assert re.search(r"PREFECT_SERVER_API_HOST=(127\.0\.0\.1|\$\(HOST\))", line), line
        else:
            assert re.search(r"--host (127\.0\.0\.1|\$\(HOST\))", line), line
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", makefile, re.M)
    # 0.0.0.0 appears only where the docs explain how to expose a server safely
    section = docs[docs.index("## Servers bind loopback"):]
    section = section[:section.index("\n#", 1)]
    assert docs.count("0.0.0.0") == section.count("0.0.0.0") >= 1
    assert "ssh -L" in section and "authentication" in section


def test_server_defaults_are_loopback():
    """The installed CLIs' own defaults, and Prefect's as seen by any process that imports ``flows``."""
    code = """
import json, flows
import mlflow.cli as c
from mlflow.models import cli as mc
from prefect.settings import get_current_settings
s = get_current_settings()
host = lambda cmd: [p.default for p in cmd.params if p.name == "host"][0]
print(json.dumps({"mlflow server": host(c.cli.commands["server"]), "models serve": host(mc.commands.commands["serve"]),
                  "prefect api": s.server.api.host, "runner": s.runner.server.host,
                  "worker webserver": s.worker.webserver.host}))
"""
    e = {k: v for k, v in env().items() if not k.startswith(("PREFECT_SERVER_API_HOST", "PREFECT_RUNNER_SERVER_HOST",
                                                               "PREFECT_WORKER_WEBSERVER_HOST"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hosts = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(hosts.values()) == {"127.0.0.1"}, hosts
    # the user's choice wins
    e["PREFECT_WORKER_WEBSERVER_HOST"] = "10.0.0.5"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1])["worker webserver"] == "10.0.0.5"


def test_test_servers_bind_loopback():
    services = (REPO / "tests" / "support" / "services.py").read_text()
    assert services.count('"--host", "127.0.0.1"') == 2 and 'PREFECT_SERVER_API_HOST="127.0.0.1"' in services
    assert "0.0.0.0" not in services
