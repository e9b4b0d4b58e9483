"""Input/output plumbing, one module per subject: ``store`` (local paths and ``s3://`` URLs behind one API:
listing, reading, publishing), ``s3`` (endpoint, GDAL options, s3fs, error mapping), ``raster`` (the one
reader: open, validate, windowed reads, the per-worker dataset cache), ``contract`` (the model's input
contract)."""
