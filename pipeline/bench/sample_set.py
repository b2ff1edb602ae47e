"""A small image set for the cache benchmarks: scikit-image sample photos ingested (no augmentation) into a
scratch folder, so ``spar bench cache`` runs with no data of its own."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipeline.common.photos import CACHE_BENCH_PHOTOS, sample_photo_rgb
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest


def ingest_photos(out: Path, n: int, side: int) -> str:
    """The first ``n`` of :data:`CACHE_BENCH_PHOTOS` as RGB PNGs, ingested at long side ``side`` into
    ``out/set`` (shards of ``n // 2`` images); returns the image set's path."""
    src = out / "photos"
    src.mkdir(parents=True, exist_ok=True)
    for name in CACHE_BENCH_PHOTOS[:n]:
        Image.fromarray(sample_photo_rgb(name)).save(src / f"{name}.png")
    cfg = IngestConfig(augment=False, max_side=side, shard_size=max(1, n // 2))
    ingest(str(src), str(out / "set"), cfg, workers=1, progress=False)
    return str(out / "set")
