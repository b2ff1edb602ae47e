"""Teacher features: the sharded Zarr cache (spec, writer, reader, verify, gc) and the Ray precompute that fills it."""
