"""The whole job against a real S3 server (moto on 127.0.0.1): s3:// in, s3:// out, byte-identical to a local
run; Ray workers read the input by range themselves; interrupted S3 runs leave no run record and resume;
missing objects and access denied give clear errors without credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geoseg.api import predict
from geoseg.errors import GeosegError, InputError

ROOT = Path(__file__).resolve().parent.parent
STEM = "Spain_7370579_S2Hand"


@pytest.fixture(scope="module")
def bucket(s3_server, s2_chip):
    name = s3_server.make_bucket("geoseg-e2e")
    s3_server.client().put_object(Bucket=name, Key=f"in/{STEM}.tif", Body=s2_chip.read_bytes())
    return name


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, s2_chip, dw_model):
    out = tmp_path_factory.mktemp("local")
    (rec,) = predict([str(s2_chip)], str(out), overrides=["runtime.engine=local", "tiling.block_px=256"],
                     loaded_model=dw_model)
    # report.html and item.json hold times and the input's path: not comparable byte for byte
    return {Path(v).name: Path(v).read_bytes() for k, v in rec["outputs"].items() if k not in ("manifest", "report", "item")}


def _get(s3_server, bucket, key) -> bytes:
    return s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _keys(s3_server, bucket, prefix) -> list[str]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _cli(s3_server, *args, endpoint=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return subprocess.run([sys.executable, "-m", "geoseg.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_predict_s3_to_s3_matches_local_bytes(s3_server, bucket, local_reference):
    """``geoseg predict s3://... --out s3://...`` on a local Ray started by the job; the endpoint comes from
    AWS_ENDPOINT_URL like any S3-compatible store."""
    res = _cli(s3_server, "predict", f"s3://{bucket}/in/{STEM}.tif", "--out", f"s3://{bucket}/out/",
               "--set", "tiling.block_px=256", "--set", "runtime.workers=2", "--set", "runtime.cpus_per_worker=0.5",
               "--set", "runtime.num_cpus=2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert f"s3://{bucket}/out/{STEM}/mask.tif" in res.stdout
    keys = _keys(s3_server, bucket, f"out/{STEM}/")
    assert not [k for k in keys if "/.partial/" in k], keys
    for name, want in local_reference.items():
        assert _get(s3_server, bucket, f"out/{STEM}/{name}") == want, f"{name} differs from the local run"
    record = _get(s3_server, bucket, f"out/{STEM}/run.json").decode()
    assert s3_server.secret_key not in record and s3_server.secret_key not in res.stderr
    assert s3_server.access_key not in record


def test_workers_read_input_by_range(s3_server, bucket, s2_chip):
    """All reads of the input are ranged GETs made by GDAL (/vsis3/) in the workers: no download, no data
    through the driver."""
    from tools.s3server import CountingProxy

    with CountingProxy(s3_server.endpoint_url) as proxy:
        res = _cli(s3_server, "predict", f"s3://{bucket}/in/{STEM}.tif", "--out", f"s3://{bucket}/out-proxy/",
                   "--set", "tiling.block_px=256", "--set", "vector.enabled=false", "--set", "runtime.num_cpus=2",
                   endpoint=proxy.endpoint_url)
        time.sleep(0.1)
        log = list(proxy.log)
    assert res.returncode == 0, res.stderr[-3000:]
    reads = [e for e in log if e[0] == "GET" and f"/in/{STEM}.tif" in e[1]]
    assert reads, log
    assert all(rng.startswith("bytes=") for _, _, _, _, rng in reads), reads
    puts = [e for e in log if e[0] == "PUT" and "/out-proxy/" in e[1]]
    assert any(p[1].endswith("/mask.tif") for p in puts) and any(p[1].endswith("/run.json") for p in puts)
    # run.json is the last object written in the scene (the run's report.html, beside the scenes, comes after)
    last_put = [p for p in puts if "/.partial/" not in p[1] and f"/out-proxy/{STEM}/" in p[1]][-1]
    assert last_put[1].endswith("/run.json"), puts


class _Stop(Exception):
    pass


def test_interrupted_s3_run_leaves_no_record_and_resumes(s3_server, bucket, dw_model, local_reference):
    storage = s3_server.storage_config()
    sets = ["runtime.engine=local", "tiling.block_px=256", f"storage.endpoint_url={storage.endpoint_url}",
            "storage.path_style=true"]
    out = f"s3://{bucket}/resume/"
    n = []

    def stop_after_2(result):
        n.append(result.block_id)
        if len(n) == 2:
            raise _Stop()

    with pytest.raises(_Stop):
        predict([f"s3://{bucket}/in/{STEM}.tif"], out, overrides=sets, loaded_model=dw_model, on_result=stop_after_2)
    keys = _keys(s3_server, bucket, f"resume/{STEM}/")
    assert f"resume/{STEM}/run.json" not in keys and f"resume/{STEM}/mask.tif" not in keys
    assert sorted(k.rsplit("/", 1)[1] for k in keys if "/.partial/blocks/" in k) == sorted(f"{b}.npz" for b in n)
    (rec,) = predict([f"s3://{bucket}/in/{STEM}.tif"], out, overrides=sets, loaded_model=dw_model)
    assert rec["stats"]["blocks_resumed"] == 2 and rec["stats"]["blocks_computed"] == 2
    for name, want in local_reference.items():
        assert _get(s3_server, bucket, f"resume/{STEM}/{name}") == want


def test_missing_object_and_bucket(s3_server, bucket, dw_model, tmp_path):
    sets = ["runtime.engine=local", f"storage.endpoint_url={s3_server.endpoint_url}"]
    with pytest.raises(InputError, match=rf"s3://{bucket}/in/nope\.tif: .*not found"):
        predict([f"s3://{bucket}/in/nope.tif"], str(tmp_path), overrides=sets, loaded_model=dw_model)
    with pytest.raises(GeosegError, match=r"bucket 'no-such-bucket' does not exist"):
        predict(["s3://no-such-bucket/a.tif"], str(tmp_path), overrides=sets, loaded_model=dw_model)


def test_access_denied_is_clear_and_secret_free(s3_server, bucket, dw_model, tmp_path, monkeypatch):
    key, secret = s3_server.iam_user("reader-denied", policy={
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": "s3:*", "Resource": "*"}],
    })
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    sets = ["runtime.engine=local", f"storage.endpoint_url={s3_server.endpoint_url}"]
    try:
        with s3_server.enforce_auth():
            with pytest.raises(GeosegError) as e:
                predict([f"s3://{bucket}/in/{STEM}.tif"], str(tmp_path), overrides=sets, loaded_model=dw_model)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    msg = str(e.value)
    assert f"s3://{bucket}/in/{STEM}.tif" in msg and "denied" in msg.lower()
    assert secret not in msg and key not in msg
    assert isinstance(e.value, PermissionError)
