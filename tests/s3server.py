"""The ``s3_server`` pytest fixture: one real S3 server (moto, ``tools/s3server.py``) per test session.

Enabled for every test by ``pytest_plugins = ["tests.s3server"]`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tools.s3server import MOTO_SERVER, S3Server

__all__ = ["s3_server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole session; the env carries its fake credentials.

    Skips when ``.venv-moto`` is missing (run ``tools/setup_s3_test_server.sh``), fails instead when
    ``GEOSEG_REQUIRE_S3=1``.
    """
    if not MOTO_SERVER.exists():
        msg = f"{MOTO_SERVER} missing: run tools/setup_s3_test_server.sh"
        if os.environ.get("GEOSEG_REQUIRE_S3") == "1":
            pytest.fail(msg + " (GEOSEG_REQUIRE_S3=1)")
        pytest.skip(msg)
    server = S3Server.start()
    # No shared ~/.aws files or profile may leak in; GDAL and botocore both read these.
    empty = tmp_path_factory.mktemp("aws")
    mp = pytest.MonkeyPatch()
    try:
        for k, v in server.env().items():
            if k != "AWS_ENDPOINT_URL":  # tests pass the endpoint explicitly through StorageConfig
                mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probe when a key is missing
        yield server
    finally:
        mp.undo()
        server.stop()
