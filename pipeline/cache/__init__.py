"""Teacher features: the sharded Zarr cache and the Ray precompute that fills it.

spec (format, fingerprint, checksums) -> layout (a shard's files, completion) -> writer / reader -> maintenance
(verify, gc); precompute fills a cache with Ray tasks; cli (arguments) and commands (what they do) are
``spar precompute`` and ``spar cache``. Kept empty of imports so ``spar cache --help`` stays light."""
