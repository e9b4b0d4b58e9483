"""Input/output plumbing: local paths and ``s3://`` URLs behind one API (see ``geoseg.io.store``)."""

from geoseg.io.store import (
    exists,
    expand_inputs,
    filesystem,
    gdal_env_options,
    is_s3,
    join,
    list_dir,
    open_raster,
    publish_file,
    raster_env,
    read_bytes,
    redact,
    remove,
    remove_tree,
    write_bytes,
)

__all__ = [
    "exists",
    "expand_inputs",
    "filesystem",
    "gdal_env_options",
    "is_s3",
    "join",
    "list_dir",
    "open_raster",
    "publish_file",
    "raster_env",
    "read_bytes",
    "redact",
    "remove",
    "remove_tree",
    "write_bytes",
]
