"""The one orchestrator (ingest -> precompute -> distill -> eval) behind ``spar pipeline``, ``spar demo`` and the
benchmarks."""
