"""A real S3 endpoint for the tests: ``moto_server`` on loopback, stopped by PID.

:class:`MotoServer` starts the ``moto_server`` of this interpreter's
environment on 127.0.0.1 and a free port, waits until it answers HTTP and
stops it by its PID (SIGTERM, then SIGKILL); on Linux the server is also
asked to die with the process that started it, so a killed test run leaves
nothing behind. The fixtures:

* ``moto_server`` (session): one server for the whole run;
* ``s3_bucket`` (function): a fresh, unique bucket name (not yet created),
  with the AWS environment pointed at the server (test credentials,
  ``AWS_ENDPOINT_URL``, no profile or ``~/.aws`` files) through monkeypatch,
  so that subprocesses such as the CLI inherit it.

Test modules import both fixtures (``from .s3server import moto_server,
s3_bucket``) and build backends with :func:`make_backend` or URLs with
:func:`s3_url`.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from vmrepo.storage.s3 import S3Backend

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
#: The AWS environment of every S3 test: fake credentials, a fixed region.
TEST_ENV = {"AWS_ACCESS_KEY_ID": "AKIATESTKEYID0000000",
            "AWS_SECRET_ACCESS_KEY": "test-secret-Zq3vN8yW1xK5pR7tL2mJ9hB4",
            "AWS_DEFAULT_REGION": "us-east-1"}
#: Variables of the developer's own AWS setup that must not leak into a test.
_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_CA_BUNDLE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (Linux only)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MotoServer:
    """One ``moto_server`` process on 127.0.0.1; ``env`` adds moto settings."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: "
                                   f"{self.output()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    conn.request("GET", "/")
                    conn.getresponse().read()
                    return
                finally:
                    conn.close()
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer within {timeout} s: "
                                       f"{self.output()[-2000:]}") from None
                time.sleep(0.05)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after 5 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


def aws_test_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, tmp: Path) -> None:
    """Point the AWS environment of this test (and its subprocesses) at ``endpoint``."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_bucket(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> str:
    """A unique bucket name on the server (not created), the environment set for it."""
    aws_test_env(monkeypatch, moto_server.endpoint, tmp_path)
    return f"test-{uuid.uuid4().hex[:16]}"


def s3_url(bucket: str, prefix: str = "repo") -> str:
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


#: Short timeouts, so that tests of failures stay fast.
FAST = {"connect_timeout": 2.0, "read_timeout": 5.0}


def make_backend(endpoint: str, bucket: str, prefix: str = "repo", create: bool = True,
                 **options: Any) -> S3Backend:
    """An S3Backend on ``endpoint`` (the server or a proxy in front of it)."""
    return S3Backend.from_url(s3_url(bucket, prefix), create=create,
                              options={"endpoint": endpoint, "addressing_style": "path",
                                       **FAST, **options})
