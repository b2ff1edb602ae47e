"""``distill.loader_workers = "auto"`` for a run: the arithmetic of :mod:`pipeline.data.loader_sizing` applied to
the run's images, its student and its device kind (the driver resolves it once; the plan holds the number).
"""

from __future__ import annotations

from pipeline.data.imageset import ImageSet
from pipeline.data.loader_sizing import (
    CPU_STEP_FLOPS_PER_S,
    GPU_STEP_FLOPS_PER_S,
    LoaderSizing,
    auto_loader_workers,
    sample_load_seconds,
    student_step_flops,
)
from spar_core.backbones import Backbone
from spar_core.flops import vit_arch, vit_dense_flops

__all__ = ["size_loader"]

_ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}


def _forward_flops(bb: Backbone, height: int, width: int) -> float:
    """Analytic FLOPs of the student's dense forward; towers :func:`vit_arch` does not know (DINOv3) are counted as
    2 FLOPs per parameter per token (attention's N^2 term left out: an underestimate, so more decoders)."""
    try:
        return vit_dense_flops(vit_arch(bb), height, width)["flops"]
    except AttributeError:
        tokens = (height // bb.patch_size) * (width // bb.patch_size)
        return 2.0 * tokens * sum(p.numel() for p in bb.model.parameters())


def size_loader(ims: ImageSet, bb: Backbone, cache_dtype: str | None, trainable: int | str, on_gpu: bool,
                max_workers: int, sample: int = 2000) -> LoaderSizing:  # fmt: skip
    """Decode processes per training worker for ``ims`` and student ``bb``: mean decode time against mean step time
    over the set (prefetching evens out the sizes; small views are the hard case: decoding scales with pixels, the
    step less than linearly below its attention's N^2), from up to ``sample`` evenly spaced images."""
    if not ims.records:
        return LoaderSizing(0, 0.0, 1.0, False)
    recs = ims.records[:: max(1, len(ims.records) // sample)]
    p, itemsize = bb.patch_size, _ITEMSIZE.get(cache_dtype or "", 0)
    k = bb.num_blocks if trainable == "all" else int(trainable)
    rate = GPU_STEP_FLOPS_PER_S if on_gpu else CPU_STEP_FLOPS_PER_S
    load = [
        sample_load_seconds(r.height, r.width, (r.height // p) * (r.width // p) * bb.dim * itemsize)
        for r in recs
    ]
    step = [student_step_flops(_forward_flops(bb, r.height, r.width), bb.num_blocks, k) / rate for r in recs]
    return auto_loader_workers(sum(load) / len(recs), sum(step) / len(recs), max_workers)
