"""S3 (AWS or any S3-compatible store): endpoint, GDAL's ``/vsis3/`` options, the s3fs filesystem, and errors.

Reading rasters
    ``geoseg.io.raster.open_raster`` opens an ``s3://`` object *by window* through GDAL's ``/vsis3/`` driver: it
    fetches the header, then only the byte ranges of the tiles a window needs. Nothing is downloaded whole. The
    GDAL options that keep the request count low (``gdal_env_options``) are active for the whole ``with`` block
    (``raster_env``), because some of them (range merging, HTTP/2 multiplexing) are read at read time. Why
    ``/vsis3/`` and not an s3fs file object, with request and byte counts: ``benchmarks/README.md``.

Credentials
    Never handled here. GDAL and botocore each resolve them the standard way: ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws`` files, web identity, ECS and EC2
    instance roles. rasterio's ``AWSSession`` is deliberately not used: it needs boto3 (not a dependency) and copies
    the secrets into GDAL config options, which rasterio logs at debug level. Options returned by
    ``gdal_env_options`` hold no secret, so they may be logged; error messages go through ``redact``.

Endpoint
    ``storage.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS. ``path_style`` for
    MinIO / Ceph (implied for IP and localhost endpoints), ``anonymous`` for public buckets (unsigned requests).

Errors
    ``s3_call`` and ``open_error`` turn failures into plain messages naming the path: ``InputError`` for inputs
    that are missing or not rasters; otherwise ``ObjectNotFoundError``, ``AccessDeniedError`` or
    ``EndpointUnreachableError`` (raised after ``max_retries`` retries with exponential backoff).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from geoseg.config import StorageConfig
from geoseg.errors import (
    AccessDeniedError, EndpointUnreachableError, GeosegError, InputError, ObjectNotFoundError, StorageError,
)

if TYPE_CHECKING:
    import s3fs

__all__ = ["S3_SCHEME", "is_s3", "split_s3", "s3_path", "vsis3", "redact", "resolve_endpoint", "endpoint_label",
           "gdal_env_options", "raster_env", "filesystem", "s3_call", "bucket_exists", "gdal_messages",
           "open_error", "client_error_code"]

T = TypeVar("T")

S3_SCHEME = "s3://"
# Only these names are ever fetched by /vsis3/: stops GDAL probing sidecars (.aux.xml, .ovr, .msk) with requests
# that 404 anyway. {noext} admits keys without an extension.
_GDAL_ALLOWED_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", "{noext}")
# Default for StorageConfig(): inputs and outputs may be handled without any config at all.
_DEFAULT_STORAGE = StorageConfig()


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


def s3_path(url: str) -> str:
    """The ``bucket/key`` form s3fs uses internally."""
    return url[len(S3_SCHEME):]


def vsis3(url: str) -> str:
    return "/vsis3/" + s3_path(url)


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


def endpoint_label(storage: StorageConfig) -> str:
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



def gdal_messages(exc: BaseException, limit: int = 4) -> str:
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



def open_error(path: str, storage: StorageConfig, gdal_msg: str, opened: bool = False) -> Exception:
    """Turn a GDAL failure on the ``s3://`` object ``path`` into a clear error; asks the store itself (s3fs)
    what is wrong (GDAL's message is often vague)."""
    msg = redact(gdal_msg)
    m = _HTTP_CODE.search(gdal_msg)
    if m and m.group(1) in ("401", "403"):
        return AccessDeniedError(
            f"{path}: access denied by {endpoint_label(storage)} (HTTP {m.group(1)}; check the credentials and the "
            "bucket policy)"
        )
    # GDAL's message is often vague ("does not exist in the file system"); the store's own answer is precise.
    try:
        info = s3_call(path, storage, lambda: filesystem(storage).info(s3_path(path)), missing=InputError)
    except GeosegError as e:
        return e
    if info.get("type") == "directory":
        return InputError(f"{path}: is a prefix, not a raster object (use a glob like {path.rstrip('/')}/*.tif)")
    if opened and ("HTTP" in gdal_msg or "CURL" in gdal_msg.upper()):
        return StorageError(f"{path}: failed reading raster from {endpoint_label(storage)} ({msg})")
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


def client_error_code(exc: BaseException) -> str | None:
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


def s3_call(
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
        raise _not_found(path, storage, missing_cls, client_error_code(e)) from None
    except PermissionError as e:
        raise _denied(path, storage, client_error_code(e)) from None
    except Exception as e:
        if _is_connection_error(e):
            raise EndpointUnreachableError(
                f"{path}: cannot reach S3 endpoint {endpoint_label(storage)} after {storage.max_retries} "
                f"{'retry' if storage.max_retries == 1 else 'retries'} ({type(e).__name__}); check "
                "storage.endpoint_url / AWS_ENDPOINT_URL and the network"
            ) from None
        code = client_error_code(e)
        if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
            raise _not_found(path, storage, missing_cls, code) from None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            raise _denied(path, storage, code) from None
        raise StorageError(f"{path}: S3 request to {endpoint_label(storage)} failed: {redact(str(e))}") from None


def _not_found(path: str, storage: StorageConfig, cls: type[GeosegError], code: str | None) -> GeosegError:
    bucket, key = split_s3(path)
    if code == "NoSuchBucket" or (code != "NoSuchKey" and not bucket_exists(bucket, storage)):
        return cls(f"{path}: bucket {bucket!r} does not exist at {endpoint_label(storage)}")
    what = "input raster" if cls is InputError else "object"
    return cls(f"{path}: {what} not found (no key {key!r} in bucket {bucket!r})")


def _denied(path: str, storage: StorageConfig, code: str | None) -> AccessDeniedError:
    detail = f"{code}; " if code and not code.isdigit() else ""
    return AccessDeniedError(
        f"{path}: access denied by {endpoint_label(storage)} ({detail}check the credentials and the bucket policy)"
    )


def bucket_exists(bucket: str, storage: StorageConfig) -> bool:
    """False only when the store says the bucket is missing (a denied probe counts as existing)."""
    try:
        filesystem(storage).call_s3("head_bucket", Bucket=bucket)
        return True
    except FileNotFoundError:
        return False
    except Exception as e:
        return client_error_code(e) not in ("NoSuchBucket", "404", "NotFound")
