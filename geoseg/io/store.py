"""Storage: local paths and ``s3://`` URLs (AWS or any S3-compatible store) behind one small API.

Reading rasters
    ``open_raster(path, storage)`` opens a local file or an ``s3://`` object *by window*: GDAL's ``/vsis3/`` driver
    fetches the header, then only the byte ranges of the tiles a window needs. Nothing is downloaded whole.
    The GDAL options that keep the request count low (``gdal_env_options``) are active for the whole ``with``
    block, because some of them (range merging, HTTP/2 multiplexing) are read at read time, not at open.

    Measured with ``benchmarks/bench_s3_read.py`` against moto's S3 server on 127.0.0.1: a 2048x2048 13-band int16
    COG (the Sentinel-2 chip tiled, 256-px blocks, deflate, 61.3 MB). A = open + 4 scattered 256x256 windows (one
    block each), B = open + one 1024x1024 window (16 blocks). Requests and bytes counted by a proxy; time is the
    median of 3 on a fresh object each, "emulated" through the proxy adding 20 ms per request and 100 MB/s
    (loopback alone makes a whole download look free). Shared 2-core machine, so times are +-30 %:

    ===============================  ====  ========  =========  ====  ========  =========
    opener                           A     A bytes   A time     B     B bytes   B time
                                     req.            emulated   req.            emulated
    ===============================  ====  ========  =========  ====  ========  =========
    GDAL /vsis3/ + these options     5     2.6 MB    0.60 s     5     10.0 MB   0.56 s
    GDAL /vsis3/, GDAL defaults      6     2.6 MB    0.73 s     6     10.0 MB   0.80 s
    s3fs file object (defaults)      5     54.3 MB   1.36 s     4     52.4 MB   1.28 s
    s3fs, 256 KiB block cache        18    3.9 MB    1.96 s     44    10.8 MB   4.83 s
    ===============================  ====  ========  =========  ====  ========  =========

    One 256x256 block costs 2 ranged GETs, 0.7 MB of the 61 MB object (64 KiB header + the tile); each further
    block of the same scene one GET (tests/test_store.py measures it). GDAL's defaults add a LIST of the
    "directory" at open and a second header GET. s3fs as opener reads through Python: its default 50 MiB
    read-ahead downloads nearly the whole object, and small blocks cost a request per cache miss with no range
    merging. So /vsis3/ is the opener.

Credentials
    Never handled here. GDAL and botocore each resolve them the standard way: ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws`` files, web identity, ECS and EC2
    instance roles. rasterio's ``AWSSession`` is deliberately not used: it needs boto3 (not a dependency) and copies
    the secrets into GDAL config options, which rasterio logs at debug level. Options returned by
    ``gdal_env_options`` hold no secret, so they may be logged; error messages go through ``redact``.

Endpoint
    ``storage.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS. ``path_style`` for
    MinIO / Ceph (implied for IP and localhost endpoints), ``anonymous`` for public buckets (unsigned requests).

Writing
    Outputs are written to a local file and then published: ``publish_file`` renames within a filesystem (or copies
    to a temporary name beside the destination and renames), and uploads to S3 in one PUT or one completed
    multipart upload (aborted on failure), so an object appears whole or not at all. The caller writes its run
    record last; its presence means every output before it is complete.

Errors
    Plain messages naming the path: ``InputError`` for inputs that are missing or not rasters; for everything else
    ``StorageError`` subclasses ``ObjectNotFoundError`` (also ``FileNotFoundError``), ``AccessDeniedError`` (also
    ``PermissionError``), ``EndpointUnreachableError`` (also ``ConnectionError``; raised after ``max_retries`` retries
    with exponential backoff). All pickle across Ray as (class, message).
"""

from __future__ import annotations

import contextlib
import errno
import glob as globlib
import ipaddress
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from geoseg.config import StorageConfig
from geoseg.errors import GeosegError, InputError, StorageError, write_failure

if TYPE_CHECKING:
    import rasterio.io
    import s3fs

__all__ = [
    "RASTER_SUFFIXES",
    "ObjectNotFoundError",
    "AccessDeniedError",
    "EndpointUnreachableError",
    "is_s3",
    "join",
    "split_s3",
    "redact",
    "resolve_endpoint",
    "gdal_env_options",
    "raster_env",
    "open_raster",
    "filesystem",
    "expand_inputs",
    "publish_file",
    "write_bytes",
    "read_bytes",
    "exists",
    "remove",
    "remove_tree",
    "list_dir",
]

T = TypeVar("T")

S3_SCHEME = "s3://"
#: What a directory or prefix expands to (case-insensitive).
RASTER_SUFFIXES = (".tif", ".tiff")
# Only these names are ever fetched by /vsis3/: stops GDAL probing sidecars (.aux.xml, .ovr, .msk) with requests
# that 404 anyway. {noext} admits keys without an extension.
_GDAL_ALLOWED_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", "{noext}")
_GLOB_CHARS = re.compile(r"[*?\[]")
#: Files up to twice this size are uploaded in one PUT; larger ones in parts of this size (multipart upload,
#: invisible until completed). S3 allows at most 10,000 parts, so huge files get larger parts.
MULTIPART_PART_SIZE = 64 * 2**20
_MAX_PARTS = 10_000
# Default for StorageConfig(): inputs and outputs may be handled without any config at all.
_DEFAULT_STORAGE = StorageConfig()


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object or file at the path, or its bucket does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The store refused the request (credentials, bucket policy, IAM)."""


class EndpointUnreachableError(StorageError, ConnectionError):
    """The S3 endpoint did not answer, after the configured retries."""


# ---------------------------------------------------------------------------------------------------------------
# Paths


def is_s3(path: str | os.PathLike[str]) -> bool:
    """True for ``s3://bucket/key`` URLs."""
    return isinstance(path, str) and path.startswith(S3_SCHEME)


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ``InputError`` without a bucket."""
    rest = url[len(S3_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{url}: an S3 URL needs a bucket, like s3://bucket/key")
    return bucket, key


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path components; S3 URLs always with ``/``, local paths with ``os.path.join``."""
    base = os.fspath(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            p = p.strip("/")
            if p:
                out += "/" + p
        return out
    return os.path.join(base, *parts)


def _s3_path(url: str) -> str:
    """The ``bucket/key`` form s3fs uses internally."""
    return url[len(S3_SCHEME):]


def _vsis3(url: str) -> str:
    return "/vsis3/" + _s3_path(url)


# ---------------------------------------------------------------------------------------------------------------
# Secrets


_SECRET_PATTERNS = [
    re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"),
    re.compile(r"(?i)(Signature=)[0-9a-f]{16,}"),
    re.compile(r"(?i)(Credential=)[^,\s\"']+"),
    re.compile(r"(?i)(aws_(?:secret_access_key|session_token|access_key_id)\s*[=:]\s*)\S+"),
    re.compile(r"(://)[^/@\s:]+:[^/@\s]+@"),  # user:password@ in URLs
    # S3 error bodies (which GDAL quotes) echo the key id and what was signed.
    re.compile(r"(<(?:AWSAccessKeyId|StringToSign|StringToSignBytes|CanonicalRequest|CanonicalRequestBytes|"
               r"SignatureProvided)>)[^<]*"),
    re.compile(r"()\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b"),  # AWS access key ids, from wherever they came
]


def redact(text: str) -> str:
    """``text`` with AWS credentials (from the environment, and any signature or ``user:pass@``) masked."""
    out = str(text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    for pat in _SECRET_PATTERNS:
        out = pat.sub(lambda m: m.group(1) + ("***@" if m.group(1) == "://" else "***"), out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def resolve_endpoint(storage: StorageConfig | None = None) -> str | None:
    """The S3 endpoint URL: ``storage.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else None
    (AWS itself)."""
    storage = storage or _DEFAULT_STORAGE
    url = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return url.rstrip("/") if url else None


def _region(storage: StorageConfig) -> str | None:
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _path_style(storage: StorageConfig) -> bool:
    """Path-style addressing: as configured, and always for IP / localhost endpoints (no bucket subdomains)."""
    if storage.path_style:
        return True
    endpoint = resolve_endpoint(storage)
    if not endpoint:
        return False
    host = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _endpoint_label(storage: StorageConfig) -> str:
    return redact(resolve_endpoint(storage) or "AWS S3")


def gdal_env_options(storage: StorageConfig | None = None) -> dict[str, str]:
    """GDAL config options for ``rasterio.Env`` so that windowed reads over ``/vsis3/`` cost few requests.

    Holds no secret (GDAL finds credentials itself), so the dict may be logged.
    """
    storage = storage or _DEFAULT_STORAGE
    opts: dict[str, str] = {
        # No directory listing at open (one LIST per scene, useless for COGs without sidecars).
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        # Never request sidecar names (.aux.xml, .ovr, .msk) that would only 404.
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(_GDAL_ALLOWED_EXTENSIONS),
        # Per-file block cache: reads of neighbouring windows reuse fetched bytes.
        "VSI_CACHE": "TRUE",
        "VSI_CACHE_SIZE": str(32 * 1024 * 1024),
        # One ranged GET for adjacent tiles; HTTP/2 multiplexes the rest over one connection.
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
        # The first GET at open fetches this much: a COG's whole header (IFDs + tile index) in one request
        # (GDAL's 16 KiB default needed a second GET for the 13-band test COG).
        "GDAL_INGESTED_BYTES_AT_OPEN": str(64 * 1024),
        # Process-wide cache of fetched ranges (default 16 MiB): keeps scene headers cached in a worker that reads
        # many blocks, so each further block costs one GET; read once, when GDAL's network layer starts.
        "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 1024 * 1024),
        # Bounded retries with exponential backoff (GDAL doubles the delay each time), then fail.
        "GDAL_HTTP_MAX_RETRY": str(storage.max_retries),
        "GDAL_HTTP_RETRY_DELAY": "0.5",
        "GDAL_HTTP_CONNECTTIMEOUT": "10",
        "GDAL_HTTP_TIMEOUT": "120",
    }
    endpoint = resolve_endpoint(storage)
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        opts["AWS_S3_ENDPOINT"] = parts.netloc.rsplit("@", 1)[-1] + parts.path.rstrip("/")
        opts["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
    if _path_style(storage):
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if storage.anonymous:
        opts["AWS_NO_SIGN_REQUEST"] = "YES"
    region = _region(storage)
    if region:
        opts["AWS_REGION"] = region
    return opts


@contextlib.contextmanager
def raster_env(storage: StorageConfig | None = None, path: str | None = None) -> Iterator[Any]:
    """``rasterio.Env`` with ``gdal_env_options(storage)``; GDAL resolves credentials itself.

    Given ``path`` (an S3 key whose extension GDAL would otherwise refuse), the extension filter is dropped.
    """
    import rasterio
    from rasterio.session import DummySession

    opts = gdal_env_options(storage)
    if path is not None and is_s3(path):
        name = path.rsplit("/", 1)[-1].lower()
        if "." in name and not name.endswith(tuple(e for e in _GDAL_ALLOWED_EXTENSIONS if e.startswith("."))):
            del opts["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"]
    # DummySession: rasterio would otherwise build an AWSSession (boto3) and put the secrets into GDAL's config.
    with rasterio.Env(session=DummySession(), **opts) as env:
        yield env


_HTTP_CODE = re.compile(r"HTTP response code:\s*(\d{3})")


@contextlib.contextmanager
def open_raster(
    path: str | os.PathLike[str], storage: StorageConfig | None = None, **kwargs: Any
) -> Iterator[rasterio.io.DatasetReader]:
    """Open a local raster or an ``s3://`` object for windowed reading::

        with open_raster("s3://bucket/scene.tif", storage) as ds:
            block = ds.read(window=Window(0, 0, 256, 256))

    A context manager, not a bare dataset: the GDAL options must stay active while reading. Failures opening or
    reading become ``InputError`` (missing, not a raster) or ``StorageError`` (denied, unreachable), naming the path.
    ``kwargs`` go to ``rasterio.open``.
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    storage = storage or _DEFAULT_STORAGE
    path = os.fspath(path)
    target = _vsis3(path) if is_s3(path) else path
    with raster_env(storage, path):
        try:
            ds = rasterio.open(target, **kwargs)
        except RasterioIOError as e:
            raise _raster_error(path, storage, _gdal_messages(e)) from None
        with ds:
            try:
                yield ds
            except RasterioIOError as e:
                # A read of this dataset failing mid-way (connection lost, object deleted, corrupt tile). Errors
                # that do not name it (a rasterio write in the caller's block, say) pass through untouched.
                detail = _gdal_messages(e)
                if os.path.basename(path.rstrip("/")) not in detail:
                    raise
                raise _raster_error(path, storage, detail, opened=True) from None


def _gdal_messages(exc: BaseException, limit: int = 4) -> str:
    """The distinct messages along a rasterio exception's chain ("Read failed. See previous exception" says
    nothing; the GDAL errors chained to it name the file, the block and the HTTP status)."""
    out: list[str] = []
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10 and len(out) < limit:
        msg = str(cur).strip()
        if msg and "See previous exception" not in msg and msg not in out:
            out.append(msg)
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return "; ".join(out) or type(exc).__name__


def _raster_error(path: str, storage: StorageConfig, gdal_msg: str, opened: bool = False) -> Exception:
    """Turn a GDAL failure on ``path`` into a clear error; asks the store itself (s3fs) what is wrong."""
    msg = redact(gdal_msg)
    if not is_s3(path):
        if not os.path.exists(path):
            return InputError(f"{path}: input raster not found")
        if os.path.isdir(path):
            return InputError(f"{path}: is a directory, not a raster")
        if opened:
            return InputError(f"{path}: failed reading raster ({msg})")
        return InputError(f"{path}: not a readable raster ({msg})")
    m = _HTTP_CODE.search(gdal_msg)
    if m and m.group(1) in ("401", "403"):
        return AccessDeniedError(
            f"{path}: access denied by {_endpoint_label(storage)} (HTTP {m.group(1)}; check the credentials and the "
            "bucket policy)"
        )
    # GDAL's message is often vague ("does not exist in the file system"); the store's own answer is precise.
    try:
        info = _s3_call(path, storage, lambda: filesystem(storage).info(_s3_path(path)), missing=InputError)
    except GeosegError as e:
        return e
    if info.get("type") == "directory":
        return InputError(f"{path}: is a prefix, not a raster object (use a glob like {join(path, '*.tif')})")
    if opened and ("HTTP" in gdal_msg or "CURL" in gdal_msg.upper()):
        return StorageError(f"{path}: failed reading raster from {_endpoint_label(storage)} ({msg})")
    if opened:
        return InputError(f"{path}: failed reading raster, corrupt block? ({msg})")
    return InputError(f"{path}: not a readable raster ({info.get('size', '?')} bytes; GDAL: {msg})")


# ---------------------------------------------------------------------------------------------------------------
# S3 filesystem (s3fs)


def filesystem(storage: StorageConfig | None = None) -> s3fs.S3FileSystem:
    """An ``s3fs.S3FileSystem`` for ``storage``.

    fsspec caches instances per (arguments, process, thread), so repeated calls are cheap, and a forked or
    remote Ray worker builds its own from the same config (instances pickle as their constructor arguments,
    never as sockets). Listings are not cached: other workers write objects meanwhile. Credentials are resolved
    once per instance; after changing them in ``os.environ`` call ``s3fs.S3FileSystem.clear_instance_cache()``.
    """
    import s3fs

    storage = storage or _DEFAULT_STORAGE
    config_kwargs: dict[str, Any] = {
        # botocore retries connection errors and 5xx/throttling with exponential backoff (standard mode);
        # total_max_attempts counts the first try.
        "retries": {"total_max_attempts": storage.max_retries + 1, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 120,
    }
    if _path_style(storage):
        config_kwargs["s3"] = {"addressing_style": "path"}
    client_kwargs: dict[str, Any] = {}
    region = _region(storage)
    if region:
        client_kwargs["region_name"] = region
    fs = s3fs.S3FileSystem(
        anon=storage.anonymous,
        endpoint_url=resolve_endpoint(storage),
        client_kwargs=client_kwargs,
        config_kwargs=config_kwargs,
        use_listings_cache=False,
    )
    # s3fs's own retry loop (read timeouts, throttling), counted in attempts; a class attribute, not an argument.
    fs.retries = storage.max_retries + 1
    return fs


def _client_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError in ``exc`` or its cause chain."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            code = err.get("Code")
            if code:
                return str(code)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _is_connection_error(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        return False
    return isinstance(exc, (BotoConnectionError, HTTPClientError)) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ETIMEDOUT)
    )


def _s3_call(
    path: str,
    storage: StorageConfig,
    fn: Callable[[], T],
    *,
    missing: type[GeosegError] | None = None,
) -> T:
    """Run one s3fs call on ``path`` and translate its failure into a clear geoseg error.

    ``missing`` is the class for a missing bucket or key (``ObjectNotFoundError`` unless given).
    """
    missing_cls = missing or ObjectNotFoundError
    try:
        return fn()
    except GeosegError:
        raise
    except FileNotFoundError as e:
        raise _not_found(path, storage, missing_cls, _client_error_code(e)) from None
    except PermissionError as e:
        raise _denied(path, storage, _client_error_code(e)) from None
    except Exception as e:
        if _is_connection_error(e):
            raise EndpointUnreachableError(
                f"{path}: cannot reach S3 endpoint {_endpoint_label(storage)} after {storage.max_retries} "
                f"{'retry' if storage.max_retries == 1 else 'retries'} ({type(e).__name__}); check "
                "storage.endpoint_url / AWS_ENDPOINT_URL and the network"
            ) from None
        code = _client_error_code(e)
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            raise _not_found(path, storage, missing_cls, code) from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            raise _denied(path, storage, code) from None
        raise StorageError(f"{path}: S3 request to {_endpoint_label(storage)} failed: {redact(str(e))}") from None


def _not_found(path: str, storage: StorageConfig, cls: type[GeosegError], code: str | None) -> GeosegError:
    bucket, key = split_s3(path)
    if code == "NoSuchBucket" or (code != "NoSuchKey" and not _bucket_exists(bucket, storage)):
        return cls(f"{path}: bucket {bucket!r} does not exist at {_endpoint_label(storage)}")
    what = "input raster" if cls is InputError else "object"
    return cls(f"{path}: {what} not found (no key {key!r} in bucket {bucket!r})")


def _denied(path: str, storage: StorageConfig, code: str | None) -> AccessDeniedError:
    detail = f"{code}; " if code and not code.isdigit() else ""
    return AccessDeniedError(
        f"{path}: access denied by {_endpoint_label(storage)} ({detail}check the credentials and the bucket policy)"
    )


def _bucket_exists(bucket: str, storage: StorageConfig) -> bool:
    """False only when the store says the bucket is missing (a denied probe counts as existing)."""
    try:
        filesystem(storage).call_s3("head_bucket", Bucket=bucket)
        return True
    except FileNotFoundError:
        return False
    except Exception as e:
        return _client_error_code(e) not in ("NoSuchBucket", "404", "NotFound")


# ---------------------------------------------------------------------------------------------------------------
# Listing


def expand_inputs(paths: Iterable[str | os.PathLike[str]], storage: StorageConfig | None = None) -> list[str]:
    """Expand input paths into raster paths: sorted, without duplicates.

    * a file or an ``s3://`` object: itself;
    * a directory or an ``s3://bucket/prefix/``: the ``*.tif`` / ``*.tiff`` directly inside (not recursive, so an
      output folder inside it is not picked up; use ``**`` for that);
    * a glob (``*``, ``?``, ``[...]``, ``**`` recursive), local or ``s3://bucket/scenes/*.tif``: the files it
      matches.

    Local results are absolute paths. A path or pattern that yields nothing raises ``InputError`` naming it.
    """
    storage = storage or _DEFAULT_STORAGE
    found: set[str] = set()
    for item in paths:
        p = os.fspath(item)
        hits = _expand_s3(p, storage) if is_s3(p) else _expand_local(p)
        found.update(hits)
    return sorted(found)


def _is_raster_name(name: str) -> bool:
    return name.lower().endswith(RASTER_SUFFIXES)


def _expand_local(p: str) -> list[str]:
    if _GLOB_CHARS.search(p):
        hits = [os.path.abspath(h) for h in globlib.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(h)]
        if not hits:
            raise InputError(f"{p}: pattern matches no file")
        return hits
    path = os.path.expanduser(p)
    if os.path.isdir(path):
        hits = [os.path.abspath(e.path) for e in os.scandir(path) if e.is_file() and _is_raster_name(e.name)]
        if not hits:
            raise InputError(f"{p}: directory holds no {'/'.join(RASTER_SUFFIXES)} raster")
        return hits
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    raise InputError(f"{p}: input not found")


def _expand_s3(p: str, storage: StorageConfig) -> list[str]:
    fs = filesystem(storage)
    bucket, key = split_s3(p)
    if _GLOB_CHARS.search(key):
        found = _s3_call(p, storage, lambda: fs.glob(_s3_path(p), detail=True), missing=InputError)
        hits = [S3_SCHEME + name for name, info in found.items() if info.get("type") == "file"]
        if not hits:
            if not _bucket_exists(bucket, storage):
                raise InputError(f"{p}: bucket {bucket!r} does not exist at {_endpoint_label(storage)}")
            raise InputError(f"{p}: pattern matches no object")
        return hits
    info = _s3_call(p, storage, lambda: fs.info(_s3_path(p)), missing=InputError)
    if info.get("type") == "file" and key and not key.endswith("/"):
        return [p]
    entries = _s3_call(p, storage, lambda: fs.ls(_s3_path(p).rstrip("/") or bucket, detail=True), missing=InputError)
    hits = [S3_SCHEME + e["name"] for e in entries if e.get("type") == "file" and _is_raster_name(e["name"])]
    if not hits:
        raise InputError(f"{p}: prefix holds no {'/'.join(RASTER_SUFFIXES)} object")
    return hits


def list_dir(prefix: str | os.PathLike[str], storage: StorageConfig | None = None) -> list[str]:
    """Full paths of the entries directly inside a directory / ``s3://`` prefix, sorted; [] when it is absent."""
    prefix = os.fspath(prefix)
    if not is_s3(prefix):
        if not os.path.isdir(prefix):
            return []
        return sorted(os.path.join(prefix, name) for name in os.listdir(prefix))
    storage = storage or _DEFAULT_STORAGE
    fs = filesystem(storage)
    bucket, _ = split_s3(prefix)
    try:
        names = _s3_call(prefix, storage, lambda: fs.ls(_s3_path(prefix).rstrip("/") or bucket, detail=False))
    except ObjectNotFoundError:
        return []
    return sorted(S3_SCHEME + n.rstrip("/") for n in names)


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing whole objects


def exists(path: str | os.PathLike[str], storage: StorageConfig | None = None) -> bool:
    """Whether a file / object (or a directory / non-empty prefix) exists. Denied or unreachable raises."""
    path = os.fspath(path)
    if not is_s3(path):
        return os.path.exists(path)
    storage = storage or _DEFAULT_STORAGE
    fs = filesystem(storage)
    try:
        _s3_call(path, storage, lambda: fs.info(_s3_path(path)))
        return True
    except ObjectNotFoundError:
        return False


def read_bytes(path: str | os.PathLike[str], storage: StorageConfig | None = None) -> bytes:
    """The whole content of a (small) file or object; ``ObjectNotFoundError`` when absent."""
    path = os.fspath(path)
    if not is_s3(path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path}: file not found") from None
        except OSError as e:
            raise StorageError(f"{path}: cannot read ({e.strerror})") from None
    storage = storage or _DEFAULT_STORAGE
    fs = filesystem(storage)
    return _s3_call(path, storage, lambda: fs.cat_file(_s3_path(path)))


def write_bytes(dest: str | os.PathLike[str], data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` atomically: readers see the old content or the new, never a part."""
    dest = os.fspath(dest)
    if is_s3(dest):
        storage = storage or _DEFAULT_STORAGE
        fs = filesystem(storage)
        _s3_call(dest, storage, lambda: fs.pipe_file(_s3_path(dest), bytes(data)))  # one PUT (multipart if huge)
        return
    parent = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(parent, exist_ok=True)
        # Not mkstemp: its 0600 would stick to the published file; 0666 less the umask is what open() gives.
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        err = write_failure(dest, e)
        raise (err if isinstance(err, StorageError) else StorageError(f"{dest}: cannot write ({e.strerror or e})")) from None


def publish_file(
    local_path: str | os.PathLike[str], dest: str | os.PathLike[str], storage: StorageConfig | None = None
) -> None:
    """Publish a finished local file at ``dest`` atomically: it appears whole or not at all.

    ``local_path`` is consumed (moved, or deleted after upload). Local: ``os.replace`` on the same filesystem,
    else copy to a temporary name beside ``dest`` and rename. S3: one PUT, or a multipart upload that becomes
    visible only when completed (s3fs aborts it on failure).
    """
    src = os.fspath(local_path)
    dest = os.fspath(dest)
    if not os.path.isfile(src):
        raise StorageError(f"{src}: cannot publish to {dest}: source file not found")
    if is_s3(dest):
        storage = storage or _DEFAULT_STORAGE
        fs = filesystem(storage)
        part = max(MULTIPART_PART_SIZE, -(-os.path.getsize(src) // _MAX_PARTS))
        _s3_call(dest, storage, lambda: fs.put_file(src, _s3_path(dest), chunksize=part))
        with contextlib.suppress(OSError):
            os.unlink(src)
        return
    parent = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(parent, exist_ok=True)
        try:
            os.replace(src, dest)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        # Another filesystem: copy beside dest under a temporary name, then rename into place.
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(dest)}")
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.unlink(src)
    except OSError as e:
        err = write_failure(dest, e, "publish it")
        raise (err if isinstance(err, StorageError) else StorageError(f"{dest}: cannot publish {src} ({e.strerror or e})")) from None


def remove(path: str | os.PathLike[str], storage: StorageConfig | None = None, missing_ok: bool = True) -> None:
    """Delete one file or object."""
    path = os.fspath(path)
    if not is_s3(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            if not missing_ok:
                raise ObjectNotFoundError(f"{path}: file not found") from None
        except OSError as e:
            raise StorageError(f"{path}: cannot delete ({e.strerror})") from None
        return
    storage = storage or _DEFAULT_STORAGE
    fs = filesystem(storage)
    if not missing_ok and not exists(path, storage):
        raise ObjectNotFoundError(f"{path}: object not found")
    _s3_call(path, storage, lambda: fs.rm_file(_s3_path(path)))  # S3 DELETE of a missing key succeeds


def remove_tree(prefix: str | os.PathLike[str], storage: StorageConfig | None = None) -> None:
    """Delete a directory, or every object under ``prefix/`` (never a whole bucket)."""
    prefix = os.fspath(prefix)
    if not is_s3(prefix):
        if os.path.abspath(prefix) == os.path.abspath(os.sep):
            raise StorageError(f"{prefix}: refusing to delete the filesystem root")
        try:
            shutil.rmtree(prefix)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"{prefix}: cannot delete ({e.strerror})") from None
        return
    storage = storage or _DEFAULT_STORAGE
    bucket, key = split_s3(prefix)
    key = key.strip("/")
    if not key:
        raise StorageError(f"{prefix}: refusing to delete a whole bucket; name a prefix inside it")
    fs = filesystem(storage)
    # Only keys under "prefix/": "out" must not take "out2/..." with it.
    base = f"{bucket}/{key}/"
    try:
        keys = _s3_call(prefix, storage, lambda: fs.find(base))
    except ObjectNotFoundError:
        return
    keys = [k for k in keys if k.startswith(base)]
    if keys:
        _s3_call(prefix, storage, lambda: fs.rm(keys))
