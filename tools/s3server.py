"""A real S3 server on 127.0.0.1 for tests and benchmarks: moto's standalone server, run from its own venv.

moto pins botocore differently from s3fs, so it lives in ``.venv-moto/`` (``tools/setup_s3_test_server.sh``) and runs
as a subprocess; the tests talk to it over HTTP exactly as they would to AWS or MinIO.

The pytest fixture ``s3_server`` (``tests/s3server.py``) starts one per test session; benchmarks use ``S3Server``
directly. Without ``.venv-moto`` the S3 tests skip, unless ``GEOSEG_REQUIRE_S3=1`` (CI), where they fail.

Also here: ``CountingProxy``, a loopback HTTP proxy that forwards to the server and counts requests and bytes (and
can add latency and a bandwidth cap), so a test can *measure* what a read costs; and ``S3Server.enforce_auth()``,
which makes moto check signatures and IAM policies, so access-denied is a real 403 from the server, not a mock.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MOTO_VENV = ROOT / ".venv-moto"
MOTO_SERVER = MOTO_VENV / "bin" / "moto_server"

# Fake credentials: moto accepts any key until IAM enforcement is switched on.
ACCESS_KEY = "AKIAGEOSEGTESTKEY000"
SECRET_KEY = "geoseg-test-secret-DO-NOT-LEAK-0123456789"
REGION = "us-east-1"

__all__ = ["S3Server", "CountingProxy", "ACCESS_KEY", "SECRET_KEY", "REGION", "free_port", "MOTO_SERVER"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read()
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url}: no answer within {timeout_s:.0f} s")


@dataclass
class S3Server:
    """A running moto server; ``endpoint_url`` plus the fake credentials the session's env carries."""

    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    proc: subprocess.Popen | None = field(default=None, repr=False)

    # -- lifecycle -------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, startup_timeout_s: float = 30.0) -> S3Server:
        """Start ``moto_server`` on a free loopback port and wait until it answers."""
        if not MOTO_SERVER.exists():
            raise FileNotFoundError(f"{MOTO_SERVER} missing: run tools/setup_s3_test_server.sh")
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between probe and bind; try another
            port = free_port()
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "inf"},
            )
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_http(f"{url}/moto-api/", startup_timeout_s, proc)
                return cls(endpoint_url=url, proc=proc)
            except RuntimeError as e:
                last = e
                proc.kill()
                proc.wait()
                log.seek(0)
                last = RuntimeError(f"{e}; server log:\n{log.read().decode(errors='replace')[-2000:]}")
        raise RuntimeError(f"moto server did not start: {last}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs, GDAL and subprocesses (``geoseg`` CLI) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def storage_config(self, **overrides: Any):
        """A ``StorageConfig`` for this server (path-style, explicit endpoint)."""
        from geoseg.config import StorageConfig

        kw: dict[str, Any] = {"endpoint_url": self.endpoint_url, "path_style": True, "region": self.region}
        kw.update(overrides)
        return StorageConfig(**kw)

    def client(self, service: str = "s3", access_key: str | None = None, secret_key: str | None = None):
        """A plain botocore client (for setting up fixtures independently of geoseg's code)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def iam_user(self, name: str, policy: dict | None = None) -> tuple[str, str]:
        """Create an IAM user (with an inline ``policy``, or none) and return its (access key, secret).

        The server lives for the whole test session, so the name gets a unique suffix: two tests may ask for the
        same role name without colliding."""
        iam = self.client("iam")
        name = f"{name}-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def _set_auth_count(self, value: str) -> None:
        # text/plain: a form content type would make Flask swallow the body.
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset-auth", data=value.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """Within the block moto checks signatures and IAM policies on every request (so unknown keys and
        missing permissions get real 403 AccessDenied / InvalidAccessKeyId answers); restored afterwards."""
        self._set_auth_count("0")
        try:
            yield
        finally:
            self._set_auth_count("inf")


class CountingProxy:
    """A loopback HTTP/1.1 reverse proxy to ``upstream`` that counts requests and response-body bytes.

    Requests are forwarded with their original ``Host`` header, so SigV4 signatures stay valid. Point GDAL or
    s3fs at ``proxy.endpoint_url`` instead of the server's and read ``requests`` / ``bytes_out`` / ``log``.
    """

    def __init__(self, upstream: str, latency_s: float = 0.0, bandwidth_bps: float | None = None):
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        # Optional network emulation (per-request latency, per-stream bandwidth): loopback has neither, so
        # without it a full download looks as cheap as a ranged read.
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int, int, str]] = []  # (method, path, status, body bytes, range)
        self.signed: list[bool] = []  # per request: did it carry an Authorization header (or a presigned URL)?
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _forward(self) -> None:
                # Counted on arrival, not after the answer: a test that resets the proxy right after a call
                # returns must not see that call's request logged late.
                with proxy.lock:
                    proxy.signed.append("Authorization" in self.headers or "X-Amz-Signature=" in self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in ("connection", "keep-alive", "proxy-connection", "transfer-encoding"):
                            conn.putheader(k, v)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                head = self.command == "HEAD"
                delay = proxy.latency_s + (len(data) / proxy.bandwidth_bps if proxy.bandwidth_bps else 0.0)
                if delay:
                    time.sleep(delay)
                # Logged before the client can see the answer, so a reset right after a call misses none of it.
                with proxy.lock:
                    proxy.log.append((self.command, self.path, resp.status, len(data), self.headers.get("Range", "")))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    # A HEAD answer keeps the object's Content-Length; a body's is recomputed below.
                    if k.lower() in ("connection", "keep-alive", "transfer-encoding", "server", "date") or (
                        k.lower() == "content-length" and not head
                    ):
                        continue
                    self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.log)

    @property
    def bytes_out(self) -> int:
        with self.lock:
            return sum(entry[3] for entry in self.log)

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.signed.clear()

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # manual use: python tools/s3server.py -> prints the endpoint, Ctrl-C stops
    with S3Server.start() as srv:
        print(srv.endpoint_url, flush=True)
        try:
            srv.proc.wait() if srv.proc else None
        except KeyboardInterrupt:
            sys.exit(0)
