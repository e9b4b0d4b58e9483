"""Storage: local paths and ``s3://`` URLs (AWS or any S3-compatible store) behind one small API: listing,
reading and publishing objects. S3 specifics (endpoint, credentials, GDAL options, error mapping) are
``geoseg.io.s3``; rasters are opened by ``geoseg.io.raster.open_raster``.

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
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from geoseg.config import StorageConfig
from geoseg.errors import (  # noqa: F401  (the storage errors are part of this module's API)
    AccessDeniedError, EndpointUnreachableError, InputError, ObjectNotFoundError, StorageError, write_failure,
)
from geoseg.io.s3 import (  # noqa: F401  (is_s3 and split_s3 are part of this module's API)
    S3_SCHEME, bucket_exists, endpoint_label, filesystem, is_s3, s3_call, s3_path, split_s3,
)

__all__ = [
    "RASTER_SUFFIXES",
    "ObjectNotFoundError",
    "AccessDeniedError",
    "EndpointUnreachableError",
    "is_s3",
    "join",
    "split_s3",
    "expand_inputs",
    "publish_file",
    "publish_tree",
    "write_bytes",
    "read_bytes",
    "exists",
    "remove",
    "remove_tree",
    "list_dir",
]

#: What a directory or prefix expands to (case-insensitive).
RASTER_SUFFIXES = (".tif", ".tiff")
_GLOB_CHARS = re.compile(r"[*?\[]")
#: Files up to twice this size are uploaded in one PUT; larger ones in parts of this size (multipart upload,
#: invisible until completed). S3 allows at most 10,000 parts, so huge files get larger parts.
MULTIPART_PART_SIZE = 64 * 2**20
_MAX_PARTS = 10_000
# Default for StorageConfig(): inputs and outputs may be handled without any config at all.
_DEFAULT_STORAGE = StorageConfig()



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
        found = s3_call(p, storage, lambda: fs.glob(s3_path(p), detail=True), missing=InputError)
        hits = [S3_SCHEME + name for name, info in found.items() if info.get("type") == "file"]
        if not hits:
            if not bucket_exists(bucket, storage):
                raise InputError(f"{p}: bucket {bucket!r} does not exist at {endpoint_label(storage)}")
            raise InputError(f"{p}: pattern matches no object")
        return hits
    info = s3_call(p, storage, lambda: fs.info(s3_path(p)), missing=InputError)
    if info.get("type") == "file" and key and not key.endswith("/"):
        return [p]
    entries = s3_call(p, storage, lambda: fs.ls(s3_path(p).rstrip("/") or bucket, detail=True), missing=InputError)
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
        names = s3_call(prefix, storage, lambda: fs.ls(s3_path(prefix).rstrip("/") or bucket, detail=False))
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
        s3_call(path, storage, lambda: fs.info(s3_path(path)))
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
    return s3_call(path, storage, lambda: fs.cat_file(s3_path(path)))


def write_bytes(dest: str | os.PathLike[str], data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` atomically: readers see the old content or the new, never a part."""
    dest = os.fspath(dest)
    if is_s3(dest):
        storage = storage or _DEFAULT_STORAGE
        fs = filesystem(storage)
        s3_call(dest, storage, lambda: fs.pipe_file(s3_path(dest), bytes(data)))  # one PUT (multipart if huge)
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
        s3_call(dest, storage, lambda: fs.put_file(src, s3_path(dest), chunksize=part))
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


def publish_tree(local_dir: str | os.PathLike[str], dest: str | os.PathLike[str],
                 storage: StorageConfig | None = None) -> None:
    """Publish a finished local directory (a partitioned dataset) at ``dest``, replacing what was there.

    Local: one rename (after removing an older copy); S3: each file uploaded, ``_metadata`` last. Readers of a
    scene trust its outputs only once ``run.json`` (published after everything) exists."""
    src = os.fspath(local_dir)
    dest = os.fspath(dest)
    if is_s3(dest):
        names = sorted(os.listdir(src), key=lambda n: (n == "_metadata", n))
        remove_tree(dest, storage)
        for name in names:
            publish_file(os.path.join(src, name), join(dest, name), storage)
        shutil.rmtree(src, ignore_errors=True)
        return
    try:
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        try:
            os.replace(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = os.path.join(os.path.dirname(os.path.abspath(dest)), f".tmp-{uuid.uuid4().hex}-{os.path.basename(dest)}")
            shutil.copytree(src, tmp)
            os.replace(tmp, dest)
            shutil.rmtree(src, ignore_errors=True)
    except OSError as e:
        raise StorageError(f"{dest}: cannot publish {src} ({e.strerror or e})") from None


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
    s3_call(path, storage, lambda: fs.rm_file(s3_path(path)))  # S3 DELETE of a missing key succeeds


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
        keys = s3_call(prefix, storage, lambda: fs.find(base))
    except ObjectNotFoundError:
        return
    keys = [k for k in keys if k.startswith(base)]
    if keys:
        s3_call(prefix, storage, lambda: fs.rm(keys))
