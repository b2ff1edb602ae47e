"""Shared layer used by every stage: errors and typed config, storage (local or fsspec), precision, Ray task
pools, MLflow tracking, sample photos."""
