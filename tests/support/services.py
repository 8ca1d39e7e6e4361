"""Real local services for tests, bound to 127.0.0.1 and always stopped: an ``mlflow server``
(sqlite backend), a ``prefect server``, and a TCP proxy that can simulate the registry going away
in the middle of a run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def service_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1")
    env.update(extra)
    return env


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    """``mlflow server`` on a sqlite store in ``workdir``; yields its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "mlflow-server.log"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=workdir, env=service_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def prefect_server(workdir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``prefect server start`` with its own PREFECT_HOME; yields (api url, env for its clients)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = workdir / "prefect-server.log"
    env = service_env(PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_SERVER_API_HOST="127.0.0.1",
                      PREFECT_SERVER_API_PORT=str(port))
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start"], cwd=workdir, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"{api}/health", proc, log, timeout=120)
        client_env = {"PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_API_URL": api}
        yield api, client_env
    finally:
        _stop(proc)


class FlakyProxy:
    """TCP proxy 127.0.0.1:port -> target. ``trip_on(pattern, outage_s)``: the first request whose bytes
    contain ``pattern`` is cut off and every connection is refused for ``outage_s`` seconds: the
    server is unreachable from the client's side exactly at that call, and comes back afterwards."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.pattern: bytes | None = None
        self.outage_s = 0.0
        self.down_until = 0.0
        self.tripped = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def trip_on(self, pattern: bytes, outage_s: float) -> None:
        self.tripped.clear()
        self.outage_s = outage_s
        self.pattern = pattern

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self.pattern and self.pattern in data:
                    self.pattern = None
                    self.down_until = time.monotonic() + self.outage_s
                    self.tripped.set()
                    break  # the request never reaches the server
                if time.monotonic() < self.down_until:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class RestartableMlflow:
    """An ``mlflow server`` on a fixed 127.0.0.1 port and sqlite store that a test can kill (as a crash)
    and start again on the same port and data, to take the tracking server away mid-run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        log = self.workdir / "mlflow-server.log"
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", str(self.workdir / "mlartifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(log, "a") as fh:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=service_env(), stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_healthy(f"{self.url}/health", self.proc, log, timeout=120)
        return self.url

    def kill(self) -> None:
        """SIGKILL the whole server (no graceful shutdown: a crash or a pulled cable)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
