"""geoseg.io.store against a real S3 server (moto, started on 127.0.0.1 by the ``s3_server`` fixture)."""

from __future__ import annotations

import errno
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoseg.config import StorageConfig
from geoseg.errors import GeosegError, InputError, StorageError
from geoseg.io import raster, store
from geoseg.io import s3 as s3io
from geoseg.io.store import AccessDeniedError, EndpointUnreachableError, ObjectNotFoundError

if TYPE_CHECKING:
    from tools.s3server import S3Server

# The s3_server fixture; one registration per session even when tests/conftest.py names it too. Helpers from that
# module are imported inside the tests, after pytest has registered (and assertion-rewritten) it.
pytest_plugins = ["tests.s3server"]

# The fake credentials the fixture puts in the environment (tools.s3server.ACCESS_KEY / SECRET_KEY).
ACCESS_KEY = "AKIAGEOSEGTESTKEY000"
SECRET_KEY = "geoseg-test-secret-DO-NOT-LEAK-0123456789"

BUCKET = "geoseg-test"


def assert_clean(err: BaseException) -> str:
    """The message of a geoseg error; it must not carry any credential."""
    msg = str(err)
    assert isinstance(err, GeosegError), f"{type(err).__name__}: {msg}"
    for secret in (SECRET_KEY, ACCESS_KEY, os.environ.get("AWS_SECRET_ACCESS_KEY") or SECRET_KEY):
        assert secret not in msg
    assert "Signature=" not in msg
    return msg


@pytest.fixture(scope="module")
def storage(s3_server: S3Server) -> StorageConfig:
    return s3_server.storage_config()


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server, s2_chip: Path) -> str:
    """A bucket holding the real chip under several names, plus objects that are not rasters."""
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    chip = s2_chip.read_bytes()
    for key in ("scenes/chip.tif", "scenes/chip_b.TIFF", "scenes/deeper/chip_c.tif", "chip-noext", "other/chip.tif"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=chip)
    s3.put_object(Bucket=BUCKET, Key="scenes/notes.txt", Body=b"not a raster")
    s3.put_object(Bucket=BUCKET, Key="docs/readme.txt", Body=b"no rasters here")
    s3.put_object(Bucket=BUCKET, Key="bad/fake.tif", Body=b"II*\x00 this is no TIFF at all" * 10)
    return BUCKET


# -- paths and options -------------------------------------------------------------------------------------------


def test_paths() -> None:
    assert store.is_s3("s3://b/k") and not store.is_s3("/tmp/x.tif") and not store.is_s3(Path("s3:/x"))
    assert store.join("s3://b/out/", "scene", "mask.tif") == "s3://b/out/scene/mask.tif"
    assert store.join("s3://b", "/x/") == "s3://b/x"
    assert store.join("/tmp/out", "scene", "mask.tif") == os.path.join("/tmp/out", "scene", "mask.tif")
    assert store.split_s3("s3://b/a/b.tif") == ("b", "a/b.tif")
    with pytest.raises(InputError, match="needs a bucket"):
        store.split_s3("s3:///key")


def test_gdal_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    opts = s3io.gdal_env_options(StorageConfig(endpoint_url="http://127.0.0.1:9000", path_style=True,
                                                anonymous=True, region="eu-west-1", max_retries=2))
    assert opts["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and opts["AWS_HTTPS"] == "NO"
    assert opts["AWS_VIRTUAL_HOSTING"] == "FALSE" and opts["AWS_NO_SIGN_REQUEST"] == "YES"
    assert opts["AWS_REGION"] == "eu-west-1" and opts["GDAL_HTTP_MAX_RETRY"] == "2"
    assert opts["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR" and ".tif" in opts["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"]
    plain = s3io.gdal_env_options(StorageConfig())
    assert "AWS_S3_ENDPOINT" not in plain and "AWS_NO_SIGN_REQUEST" not in plain
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example.org")
    assert s3io.gdal_env_options()["AWS_S3_ENDPOINT"] == "minio.example.org"
    assert s3io.gdal_env_options()["AWS_HTTPS"] == "YES"
    assert "AWS_VIRTUAL_HOSTING" not in s3io.gdal_env_options()  # a DNS name can take bucket subdomains
    for local in ("http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000"):
        assert s3io.gdal_env_options(StorageConfig(endpoint_url=local))["AWS_VIRTUAL_HOSTING"] == "FALSE"
    # Options may be logged: they never hold a credential, even with credentials in the environment.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    assert SECRET_KEY not in repr(s3io.gdal_env_options(StorageConfig(endpoint_url="http://h:1")))


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    text = ("failed s3cr3t-value https://u:pw@host/x?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIAX%2F2024 "
            "Credential=AKIAXYZ/20240101/us-east-1/s3/aws4_request, Signature=" + "ab" * 32)
    text += " <Error><AWSAccessKeyId>AKIAPROFILEKEY123456</AWSAccessKeyId><StringToSign>AWS4 x</StringToSign>"
    out = s3io.redact(text)
    for leak in ("s3cr3t-value", "u:pw@", "abcdef0123", "AKIAX", "ab" * 32, "AKIAPROFILEKEY123456", "AWS4 x"):
        assert leak not in out


def test_errors_pickle() -> None:
    for cls in (ObjectNotFoundError, AccessDeniedError, EndpointUnreachableError):
        err = pickle.loads(pickle.dumps(cls("s3://b/k: message")))
        assert type(err) is cls and str(err) == "s3://b/k: message" and isinstance(err, StorageError)
    assert isinstance(ObjectNotFoundError("x"), FileNotFoundError)
    assert isinstance(AccessDeniedError("x"), PermissionError)


# -- reading rasters -----------------------------------------------------------------------------------------------


def test_open_raster_windows_match_local(bucket: str, storage: StorageConfig, s2_chip: Path) -> None:
    windows = [Window(0, 0, 128, 128), Window(300, 200, 100, 150), Window(384, 384, 128, 128)]
    with rasterio.open(s2_chip) as local:
        want = [local.read(window=w) for w in windows]
        profile = local.profile
    for url in (f"s3://{bucket}/scenes/chip.tif", f"s3://{bucket}/scenes/chip_b.TIFF", f"s3://{bucket}/chip-noext"):
        with raster.open_raster(url, storage) as ds:
            assert ds.profile == profile
            for w, expected in zip(windows, want, strict=True):
                np.testing.assert_array_equal(ds.read(window=w), expected)
    with raster.open_raster(s2_chip) as ds:  # local paths through the same door
        np.testing.assert_array_equal(ds.read(window=windows[0]), want[0])


def test_pickled_filesystem_works_in_a_worker(bucket: str, storage: StorageConfig) -> None:
    # Ray ships the filesystem (or just the StorageConfig) to workers: it must rebuild from its arguments.
    fs = pickle.loads(pickle.dumps(s3io.filesystem(storage)))
    assert fs.exists(f"{bucket}/scenes/chip.tif")
    assert pickle.loads(pickle.dumps(storage)) == storage


def _make_cog(chip: Path, dest: Path, size: int = 2048, block: int = 256) -> None:
    with rasterio.open(chip) as src:
        data = src.read()
        profile = src.profile
    big = np.tile(data, (1, -(-size // data.shape[1]), -(-size // data.shape[2])))[:, :size, :size]
    for k in ("tiled", "blockxsize", "blockysize", "interleave", "compress", "photometric"):
        profile.pop(k, None)
    # zstd level 1: the fastest codec to write (the test builds this 64 MB COG each run).
    profile.update(driver="COG", width=size, height=size, blocksize=block, compress="zstd", level=1, BIGTIFF="NO")
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(big)


def test_one_cog_block_costs_a_few_ranged_requests(
    s3_server: S3Server, bucket: str, s2_chip: Path, tmp_path: Path
) -> None:
    """Reading one 256x256 block of a 2048x2048 COG on S3 fetches the header and that tile, not the file."""
    from tools.s3server import CountingProxy

    cog = tmp_path / "cog.tif"
    _make_cog(s2_chip, cog)
    size = cog.stat().st_size
    s3 = s3_server.client()
    with open(cog, "rb") as f:
        s3.put_object(Bucket=bucket, Key="cog/big.tif", Body=f)
    block, other = Window(768, 1280, 256, 256), Window(1792, 256, 256, 256)
    with rasterio.open(cog) as local:
        want, want_other = local.read(window=block), local.read(window=other)

    with CountingProxy(s3_server.endpoint_url) as proxy:
        counted = s3_server.storage_config(endpoint_url=proxy.endpoint_url)
        with raster.open_raster(f"s3://{bucket}/cog/big.tif", counted) as ds:
            assert ds.block_shapes[0] == (256, 256)
            got = ds.read(window=block)
            time.sleep(0.05)  # the proxy records a request just after answering it
            one_block = list(proxy.log)
            got_other = ds.read(window=other)
            time.sleep(0.05)
            two_blocks = list(proxy.log)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_other, want_other)
    nbytes = sum(entry[3] for entry in one_block)
    print(f"\none 256x256 block of a {size} B COG: {len(one_block)} requests, {nbytes} B: {one_block}")
    assert all(method == "GET" and rng.startswith("bytes=") for method, _, _, _, rng in one_block), one_block
    assert len(one_block) <= 3
    assert nbytes < size / 20  # a few percent of the object, not a download
    # The header is cached: the next block costs one more ranged GET.
    assert len(two_blocks) - len(one_block) == 1


# -- listing -----------------------------------------------------------------------------------------------------


def test_expand_prefix_and_globs(bucket: str, storage: StorageConfig, s2_chip: Path, tmp_path: Path) -> None:
    b = f"s3://{bucket}"
    scenes = [f"{b}/scenes/chip.tif", f"{b}/scenes/chip_b.TIFF"]
    assert store.expand_inputs([f"{b}/scenes/"], storage) == scenes
    assert store.expand_inputs([f"{b}/scenes"], storage) == scenes
    assert store.expand_inputs([f"{b}/scenes/*.tif"], storage) == scenes[:1]
    assert store.expand_inputs([f"{b}/scenes/**/*.tif"], storage) == [scenes[0], f"{b}/scenes/deeper/chip_c.tif"]
    assert store.expand_inputs([f"{b}/*/chip.tif"], storage) == [f"{b}/other/chip.tif", scenes[0]]
    # objects themselves, duplicates removed, local and S3 mixed, sorted
    local = tmp_path / "a.tif"
    local.write_bytes(s2_chip.read_bytes())
    (tmp_path / "b.tiff").write_bytes(b"x")
    (tmp_path / "c.txt").write_bytes(b"x")
    got = store.expand_inputs([scenes[0], f"{b}/scenes/*.tif", str(local), str(tmp_path)], storage)
    assert got == sorted({scenes[0], str(local), str(tmp_path / "b.tiff")})
    assert store.expand_inputs([str(tmp_path / "*.t*")]) == [str(local), str(tmp_path / "b.tiff"),
                                                           str(tmp_path / "c.txt")]


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("s3://{bucket}/nothing/*.tif", "pattern matches no object"),
        ("s3://{bucket}/missing.tif", "not found"),
        ("s3://{bucket}/docs/", "prefix holds no .tif/.tiff object"),
        ("s3://{bucket}/other/empty/", "not found"),
        ("s3://no-such-bucket-x/scenes/*.tif", "bucket 'no-such-bucket-x' does not exist"),
        ("s3://no-such-bucket-x/scene.tif", "bucket 'no-such-bucket-x' does not exist"),
        ("{tmp}/none/*.tif", "pattern matches no file"),
        ("{tmp}/missing.tif", "input not found"),
        ("{tmp}", "directory holds no"),
    ],
)
def test_expand_nothing_is_an_input_error(
    bucket: str, storage: StorageConfig, tmp_path: Path, pattern: str, message: str
) -> None:
    p = pattern.format(bucket=bucket, tmp=tmp_path)
    with pytest.raises(InputError) as exc:
        store.expand_inputs([f"s3://{bucket}/scenes/chip.tif", p], storage)
    msg = assert_clean(exc.value)
    assert p in msg and message in msg


# -- writing -----------------------------------------------------------------------------------------------------


def test_publish_read_exists_remove_round_trip(bucket: str, storage: StorageConfig, tmp_path: Path) -> None:
    out = f"s3://{bucket}/runs/r1"
    data = os.urandom(300_000)
    src = tmp_path / "mask.tif"
    src.write_bytes(data)
    assert not store.exists(store.join(out, "scene", "mask.tif"), storage)
    store.publish_file(src, store.join(out, "scene", "mask.tif"), storage)
    assert not src.exists()  # consumed
    assert store.exists(store.join(out, "scene", "mask.tif"), storage)
    assert store.exists(out, storage)  # a prefix with objects counts as a directory
    assert store.read_bytes(store.join(out, "scene", "mask.tif"), storage) == data
    store.write_bytes(store.join(out, "run.json"), b'{"ok": true}', storage)
    store.write_bytes(f"s3://{bucket}/runs/r10/keep.txt", b"neighbour", storage)
    assert store.list_dir(out, storage) == [f"{out}/run.json", f"{out}/scene"]
    assert store.list_dir(f"{out}/nothing-here", storage) == []
    store.remove(store.join(out, "run.json"), storage)
    store.remove(store.join(out, "run.json"), storage)  # missing is fine by default
    with pytest.raises(ObjectNotFoundError):
        store.remove(store.join(out, "run.json"), storage, missing_ok=False)
    assert not store.exists(store.join(out, "run.json"), storage)
    store.remove_tree(out, storage)
    assert not store.exists(out, storage)
    assert store.read_bytes(f"s3://{bucket}/runs/r10/keep.txt", storage) == b"neighbour"  # r1 is not a prefix of it
    with pytest.raises(StorageError, match="whole bucket"):
        store.remove_tree(f"s3://{bucket}/", storage)


def test_local_publish_and_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "work" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(b"abc")
    dest = tmp_path / "out" / "scene" / "a.bin"
    store.publish_file(src, dest)
    assert dest.read_bytes() == b"abc" and not src.exists()
    # Across filesystems os.replace fails with EXDEV: copy beside dest, then rename.
    src.write_bytes(b"second")
    real_replace = os.replace
    calls = []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    store.publish_file(src, dest)
    monkeypatch.undo()
    assert dest.read_bytes() == b"second" and not src.exists()
    assert Path(calls[1][0]).parent == dest.parent and calls[1][0] != str(src)
    store.write_bytes(dest.parent / "run.json", b"{}")
    assert store.read_bytes(dest.parent / "run.json") == b"{}"
    assert sorted(os.listdir(dest.parent)) == ["a.bin", "run.json"]  # no temporary left behind
    with pytest.raises(ObjectNotFoundError):
        store.read_bytes(tmp_path / "nope")


def test_multipart_publish_is_invisible_until_complete(
    s3_server: S3Server, bucket: str, storage: StorageConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "MULTIPART_PART_SIZE", 5 * 2**20)  # S3's minimum part size
    data = os.urandom(12 * 2**20)  # three parts
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    dest_key = "atomic/big.bin"
    s3 = s3_server.client()
    fs = s3io.filesystem(storage)
    real_call = fs._call_s3
    seen: list[tuple[str, bool]] = []

    def visible() -> bool:
        return "Contents" in s3.list_objects_v2(Bucket=bucket, Prefix=dest_key)

    async def spy(method, *args, **kwargs):
        if method in ("upload_part", "complete_multipart_upload"):
            seen.append((method, visible()))  # looked at from outside, before each step
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", spy)
    store.publish_file(src, f"s3://{bucket}/{dest_key}", storage)
    assert [m for m, _ in seen] == ["upload_part"] * 3 + ["complete_multipart_upload"]
    assert not any(v for _, v in seen)  # never visible while parts were going up
    assert visible() and store.read_bytes(f"s3://{bucket}/{dest_key}", storage) == data


def test_failed_upload_leaves_nothing(
    s3_server: S3Server, bucket: str, storage: StorageConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "MULTIPART_PART_SIZE", 5 * 2**20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 2**20))
    fs = s3io.filesystem(storage)
    real_call = fs._call_s3
    parts = []

    async def flaky(method, *args, **kwargs):
        if method == "upload_part":
            parts.append(1)
            if len(parts) == 2:
                raise ConnectionResetError("connection lost mid-upload")
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", flaky)
    with pytest.raises(StorageError) as exc:
        store.publish_file(src, f"s3://{bucket}/atomic/failed.bin", storage)
    assert "atomic/failed.bin" in assert_clean(exc.value)
    monkeypatch.undo()
    s3 = s3_server.client()
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="atomic/failed.bin")
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted, no orphaned parts
    assert src.exists()  # not consumed: the caller may retry


# -- clear errors ------------------------------------------------------------------------------------------------


def test_missing_bucket_and_key(bucket: str, storage: StorageConfig) -> None:
    with pytest.raises(InputError) as exc:
        with raster.open_raster("s3://no-such-bucket-x/scene.tif", storage):
            pass
    assert "bucket 'no-such-bucket-x' does not exist" in assert_clean(exc.value)
    with pytest.raises(InputError) as exc:
        with raster.open_raster(f"s3://{bucket}/scenes/missing.tif", storage):
            pass
    msg = assert_clean(exc.value)
    assert f"s3://{bucket}/scenes/missing.tif" in msg and "not found" in msg
    with pytest.raises(ObjectNotFoundError) as exc2:
        store.read_bytes(f"s3://{bucket}/scenes/missing.json", storage)
    assert "no key 'scenes/missing.json'" in assert_clean(exc2.value)
    with pytest.raises(ObjectNotFoundError) as exc2:
        store.write_bytes("s3://no-such-bucket-x/run.json", b"{}", storage)
    assert "bucket 'no-such-bucket-x' does not exist" in assert_clean(exc2.value)
    with pytest.raises(InputError, match="input raster not found"):
        with raster.open_raster("/nonexistent/scene.tif"):
            pass


def test_not_a_raster(bucket: str, storage: StorageConfig) -> None:
    for key in ("bad/fake.tif", "scenes/notes.txt"):
        with pytest.raises(InputError) as exc:
            with raster.open_raster(f"s3://{bucket}/{key}", storage):
                pass
        msg = assert_clean(exc.value)
        assert f"s3://{bucket}/{key}" in msg and "not a readable raster" in msg
    with pytest.raises(InputError, match="is a prefix"):
        with raster.open_raster(f"s3://{bucket}/scenes", storage):
            pass


def test_access_denied(s3_server: S3Server, bucket: str, storage: StorageConfig, s2_chip: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforcing IAM: a user allowed to list the bucket but not to read objects gets real 403s."""
    import s3fs

    s3_server.client().put_object(Bucket=bucket, Key="private/chip.tif", Body=s2_chip.read_bytes())
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}"]},
        {"Effect": "Deny", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": [f"arn:aws:s3:::{bucket}/*"]},
    ]}
    key, secret = s3_server.iam_user("reader-denied", policy)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients hold the old credentials
    url = f"s3://{bucket}/private/chip.tif"
    try:
        with s3_server.enforce_auth():
            with pytest.raises(AccessDeniedError) as exc:
                with raster.open_raster(url, storage):
                    pass
            msg = assert_clean(exc.value)
            assert url in msg and "access denied" in msg and secret not in msg and key not in msg
            with pytest.raises(AccessDeniedError) as exc:
                store.read_bytes(url, storage)
            assert url in assert_clean(exc.value) and secret not in str(exc.value)
            with pytest.raises(AccessDeniedError):
                store.write_bytes(f"s3://{bucket}/private/out.json", b"{}", storage)
            # Listing is allowed by the policy
            assert f"s3://{bucket}/private/chip.tif" in store.list_dir(f"s3://{bucket}/private", storage)
            # An unknown access key is refused too
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
            s3fs.S3FileSystem.clear_instance_cache()
            with pytest.raises(AccessDeniedError) as exc:
                store.read_bytes(url, storage)
            assert "AKIAUNKNOWNKEY000000" not in assert_clean(exc.value)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_unreachable_endpoint_fails_fast_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.s3server import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dead = StorageConfig(endpoint_url=endpoint, path_style=True, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as exc:
        with raster.open_raster("s3://any-bucket/scene.tif", dead):
            pass
    msg = assert_clean(exc.value)
    assert endpoint in msg and "after 1 retry" in msg and "s3://any-bucket/scene.tif" in msg
    for call in (lambda: store.read_bytes("s3://any-bucket/run.json", dead),
                 lambda: store.expand_inputs(["s3://any-bucket/scenes/*.tif"], dead),
                 lambda: store.exists("s3://any-bucket/run.json", dead)):
        with pytest.raises(EndpointUnreachableError) as exc:
            call()
        assert endpoint in assert_clean(exc.value)
    assert time.monotonic() - t0 < 20


def test_fake_credentials_match_the_fixture() -> None:
    from tools import s3server

    assert (s3server.ACCESS_KEY, s3server.SECRET_KEY) == (ACCESS_KEY, SECRET_KEY)


def test_anonymous_requests_are_unsigned(s3_server: S3Server, bucket: str, s2_chip: Path) -> None:
    """``anonymous: true`` (public buckets): neither GDAL nor s3fs signs, so no credential leaves the machine."""
    from tools.s3server import CountingProxy

    public = "geoseg-public"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=public, ACL="public-read")
    s3.put_object(Bucket=public, Key="scenes/chip.tif", Body=s2_chip.read_bytes(), ACL="public-read")
    s3.put_object(Bucket=public, Key="notes.txt", Body=b"hello", ACL="public-read")
    with CountingProxy(s3_server.endpoint_url) as proxy:
        anon = s3_server.storage_config(endpoint_url=proxy.endpoint_url, anonymous=True)
        with raster.open_raster(f"s3://{public}/scenes/chip.tif", anon) as ds:
            assert ds.read(1, window=Window(0, 0, 64, 64)).shape == (64, 64)
        assert store.read_bytes(f"s3://{public}/notes.txt", anon) == b"hello"
        assert store.expand_inputs([f"s3://{public}/scenes/*.tif"], anon) == [f"s3://{public}/scenes/chip.tif"]
        time.sleep(0.05)
        assert proxy.requests >= 3 and not any(proxy.signed)
        # A private object stays private to anonymous readers: a clear access-denied, not a crash.
        with pytest.raises(AccessDeniedError):
            store.read_bytes(f"s3://{bucket}/scenes/notes.txt", anon)
        # The same reads with credentials are signed (the check above can see signatures).
        proxy.reset()
        assert store.read_bytes(f"s3://{public}/notes.txt", s3_server.storage_config(
            endpoint_url=proxy.endpoint_url)) == b"hello"
        time.sleep(0.05)
        assert proxy.signed and all(proxy.signed)


def test_object_vanishing_mid_read_is_named(s3_server: S3Server, bucket: str, storage: StorageConfig,
                                            s2_chip: Path, tmp_path: Path) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="mid/chip.tif", Body=s2_chip.read_bytes())
    url = f"s3://{bucket}/mid/chip.tif"
    with pytest.raises(InputError) as exc:
        with raster.open_raster(url, storage) as ds:
            ds.read(1, window=Window(0, 0, 64, 64))
            s3.delete_object(Bucket=bucket, Key="mid/chip.tif")
            ds.read(13)  # a strip not fetched yet
    assert url in assert_clean(exc.value) and "not found" in str(exc.value)
    # A rasterio error that is not about this dataset passes through unchanged.
    with pytest.raises(rasterio.errors.RasterioIOError, match="elsewhere.tif"):
        with raster.open_raster(s2_chip):
            rasterio.open(tmp_path / "elsewhere.tif")


def test_endpoint_from_environment(s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No storage config at all: AWS_ENDPOINT_URL (as a scheduler would set it) is enough, GDAL and s3fs alike."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    url = f"s3://{bucket}/scenes/chip.tif"
    with raster.open_raster(url) as ds:
        assert ds.count == 13
    assert store.read_bytes(f"s3://{bucket}/scenes/notes.txt") == b"not a raster"
    assert store.expand_inputs([f"s3://{bucket}/scenes/*.tif"]) == [url]
