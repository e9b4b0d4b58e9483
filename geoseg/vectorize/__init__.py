"""Class mask -> polygons, block by block, equal to one whole-mask polygonize.

The modules, in the order data flows through them (pure functions and small state objects; no Ray here):

``polygonize``  one block of the mask -> ``BlockPolygons`` in global pixel coordinates, with seam intervals.
``ogr``         GDAL's polygonize read back as Arrow WKB (what ``polygonize`` uses where GDAL's C API is
                reachable; else rasterio's ``shapes``).
``seams``       ``SeamMerger``: blocks in any order -> the exact polygons of one whole-mask polygonize.
``rings``       merging a group's rings across seams (per ring piece, not per vertex).
``sieve``       a minimum mapping unit that is identical block-wise and whole.
``simplify``    coverage simplification that keeps shared borders shared.
``attributes``  class filters, map coordinates, the attribute table, areas and perimeters in metres.
``sink``        ``PolygonSink``: the single writer's half (merge -> raster-order bands -> simplify -> filter ->
                attributes -> the format writers in ``geoseg.write``).
``file``        ``vectorize_file``: ``geoseg vectorize MASK.tif --out FILE`` with worker processes.

The public names of all of them are importable from ``geoseg.vectorize``.
"""

from geoseg.conventions import CLASS_NAMES_TAG
from geoseg.vectorize.attributes import polygon_table, resolve_classes, simplify_tolerance, to_map_coords
from geoseg.vectorize.file import VectorizeResult, vectorize_file
from geoseg.vectorize.polygonize import BlockPolygons, PolygonSet, polygonize_array, polygonize_block
from geoseg.vectorize.seams import SeamMerger, block_windows
from geoseg.vectorize.sieve import read_with_context, sieve_array, sieve_block, sieve_context_px, sieve_size_px
from geoseg.vectorize.simplify import densify_px, simplify_coverage, simplify_polygons
from geoseg.vectorize.sink import PolygonSink, output_paths, read_class_names, read_palette

__all__ = [
    "BlockPolygons",
    "PolygonSet",
    "SeamMerger",
    "PolygonSink",
    "VectorizeResult",
    "polygonize_block",
    "polygonize_array",
    "sieve_array",
    "sieve_block",
    "sieve_context_px",
    "sieve_size_px",
    "read_with_context",
    "resolve_classes",
    "to_map_coords",
    "polygon_table",
    "simplify_coverage",
    "simplify_polygons",
    "densify_px",
    "simplify_tolerance",
    "block_windows",
    "read_class_names",
    "read_palette",
    "output_paths",
    "vectorize_file",
    "CLASS_NAMES_TAG",
]
