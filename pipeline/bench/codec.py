"""``spar bench cache --codec-fidelity``: what a cache codec costs the method.

One cache per codec (``--codecs float16,int8``) is filled from the same images and teacher; the same student is
trained from each (same seeds, same steps, in-process :class:`pipeline.train.step.StepRunner`), and held-out
fidelity to the fp32 teacher (MSE and mean cosine pooled over every patch position of every held-out image:
:class:`pipeline.eval.fidelity.PooledFidelity`) is compared against the run-to-run noise of two seeds
(``--seeds 0,1``), with each codec's bytes vs raw float32.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.bench.measure import cpu_runner, scratch_dir, write_json
from pipeline.cache.precompute import PrecomputeConfig, precompute
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.common.photos import CACHE_BENCH_PHOTOS, sample_photo_rgb
from pipeline.common.tasks import init_ray
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import ImageSet, open_imageset
from pipeline.data.ingest import ingest
from pipeline.eval.fidelity import PooledFidelity
from pipeline.train.config import DistillConfig
from spar_core.backbones import Backbone, build_backbone
from spar_core.sliding import sliding_window_features


def ingest_photos(out: Path, n: int, side: int) -> str:
    """A small image set for the cache benchmarks (no data of their own needed): the first ``n`` of
    :data:`CACHE_BENCH_PHOTOS` as RGB PNGs, ingested without augmentation at long side ``side`` into ``out/set``
    (shards of ``n // 2`` images); returns the image set's path."""
    src = out / "photos"
    src.mkdir(parents=True, exist_ok=True)
    for name in CACHE_BENCH_PHOTOS[:n]:
        Image.fromarray(sample_photo_rgb(name)).save(src / f"{name}.png")
    cfg = IngestConfig(augment=False, max_side=side, shard_size=max(1, n // 2))
    ingest(str(src), str(out / "set"), cfg, workers=1, progress=False)
    return str(out / "set")


@dataclass
class HeldOut:
    """Held-out images and their fp32 teacher features, computed here (not read from any cache)."""

    keys: list[str]
    inputs: list[torch.Tensor]  # (1, 3, H, W) normalised, one per key
    targets: list[torch.Tensor]  # (1, H/p, W/p, D) fp32 teacher, one per key


def run(args: argparse.Namespace) -> int:
    """Fill a cache per codec, train a student from each per seed, print and (``--json``) write the comparison."""
    init_ray(num_cpus=os.cpu_count())
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    with scratch_dir(args.workdir, "spar-bench-codec-") as tmp:
        res = codec_fidelity(args, tmp)
    _print_codec_fidelity(res)
    write_json(args.json, res)
    return 0


def codec_fidelity(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One cache per codec from the same images; a student trained from each per seed; held-out fidelity."""
    images = args.images or ingest_photos(tmp, args.num_images, args.side)
    ims = open_imageset(images)
    keys = [r.key for r in ims.records]
    if len(keys) <= args.held_out:
        raise ValueError(
            f"--codec-fidelity needs more than --held-out {args.held_out} images, got {len(keys)}"
        )
    train_keys = keys[: -args.held_out]
    teacher = build_backbone(args.teacher, args.pretrained)
    crop = args.crop or teacher.native_size
    held = held_out(teacher, ims, keys[-args.held_out :], crop, args.stride)
    raw32 = sum(r.height // teacher.patch_size * (r.width // teacher.patch_size) * teacher.dim * 4
                for r in ims.records)  # fmt: skip
    out: dict[str, Any] = {"train_images": len(train_keys), "held_out_images": len(held.keys),
                           "steps": args.steps, "codecs": {}}  # fmt: skip
    out["baseline_single_pass"] = fidelity(teacher, held)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for codec in [c for c in args.codecs.split(",") if c]:
        # fill the codec's cache, measure what it loses on held-out targets, train a student per seed from it
        path = precompute(PrecomputeConfig(
            images=images, teacher=args.teacher, pretrained=args.pretrained, crop=crop, stride=args.stride,
            cache_root=str(tmp / "cache"), dtype=codec, autocast=args.precision, workers=1,
            cpus_per_task=args.threads or os.cpu_count() or 1, progress=False))  # fmt: skip
        cache = open_cache(path)
        disk = sum(f.stat().st_size for f in (Path(path) / "shards").rglob("*") if f.is_file())
        ref_err = [
            float((_targets(cache, k) - t[0]).norm() / t[0].norm())
            for k, t in zip(held.keys, held.targets, strict=True)
        ]
        runs = {s: fidelity(_train_student(args, cache, ims, train_keys, s), held) for s in seeds}
        print(f"codec {codec}: {disk / raw32:.3f}x raw float32, held-out target rel. error "
              f"{np.mean(ref_err):.2e}; " + "; ".join(f"seed {s}: MSE {r['mse']:.5g}, cos {r['cosine']:.5f}"
                                                      for s, r in runs.items()), flush=True)  # fmt: skip
        out["codecs"][codec] = {"ratio_vs_raw_float32": disk / raw32, "bytes": disk,
                                "target_rel_error_vs_fp32_teacher": float(np.mean(ref_err)),
                                "autocast": cache.spec.autocast, "runs": runs}  # fmt: skip
    return out


def held_out(teacher: Backbone, ims: ImageSet, keys: list[str], crop: int, stride: int) -> HeldOut:
    """The images ``keys`` of ``ims`` and their fp32 teacher features (``crop``, ``stride``)."""
    inputs, targets = [], []
    for k in keys:  # the reference: the fp32 teacher computed here, not read from any cache
        x = teacher.normalize(torch.from_numpy(np.array(ims.read(k)))[None])
        inputs.append(x)
        targets.append(sliding_window_features(teacher, x, crop, stride, window_batch=32))
    return HeldOut(keys, inputs, targets)


def _train_student(
    args: argparse.Namespace, cache: TeacherCache, ims: ImageSet, train_keys: list[str], seed: int
) -> Backbone:
    """The student trained from ``cache`` on ``train_keys`` for ``args.steps`` steps (batch 1, order by seed)."""
    cfg = DistillConfig(lr=args.lr, precision="fp32", warmup_steps=0)
    runner = cpu_runner(
        args.teacher, cfg, args.steps, pretrained=args.pretrained, blocks=args.trainable_blocks, seed=seed
    )
    rng = np.random.default_rng(seed)
    order: list[str] = []
    for step in range(args.steps):
        if not order:
            order = [train_keys[i] for i in rng.permutation(len(train_keys))]
        key = order.pop()
        item = {
            "image": torch.from_numpy(np.array(ims.read(key)))[None],  # (1, H, W, 3) uint8
            "target": _targets(cache, key)[None],  # (1, h, w, D)
        }
        runner.step(item, step)
    return runner.bb.eval()


def _targets(cache: TeacherCache, key: str) -> torch.Tensor:
    """The cached teacher features of ``key`` in float32: (h, w, D)."""
    return torch.from_numpy(np.asarray(cache.features(key), dtype=np.float32))


def fidelity(bb: Backbone, held: HeldOut) -> dict[str, float]:
    """MSE and mean cosine of ``bb``'s single pass to the fp32 teacher, pooled over every patch position of every
    held-out image (the project's one definition: :class:`pipeline.eval.fidelity.PooledFidelity`)."""
    pooled = PooledFidelity()
    with torch.no_grad():
        for x, t in zip(held.inputs, held.targets, strict=True):
            pooled.add(bb.dense(x)[0], t[0])  # (h, w, D) each
    return {"mse": pooled.mse(), "cosine": pooled.cosine()}


def _print_codec_fidelity(res: dict[str, Any]) -> None:
    c = res["codecs"]
    b = res["baseline_single_pass"]
    print(
        f"\ncodec fidelity: {res['train_images']} training / {res['held_out_images']} held-out images, "
        f"{res['steps']} steps per student; untrained single pass: MSE {b['mse']:.5g}, cos {b['cosine']:.5f}"
    )
    print(f"  {'codec':<8} {'x raw fp32':>10} {'target err':>10} " + " ".join(
        f"{'MSE s' + str(s):>12} {'cos s' + str(s):>9}" for s in next(iter(c.values()))["runs"]))  # fmt: skip
    for name, r in c.items():
        print(f"  {name:<8} {r['ratio_vs_raw_float32']:>10.3f} {r['target_rel_error_vs_fp32_teacher']:>10.2e} "
              + " ".join(f"{v['mse']:>12.5g} {v['cosine']:>9.5f}" for v in r["runs"].values()))  # fmt: skip
    # each other codec's MSE difference at the same seed against the first codec's seed-to-seed noise
    names = list(c)
    base = c[names[0]]["runs"]
    seeds = list(base)
    noise = [abs(base[seeds[i]]["mse"] - base[seeds[i + 1]]["mse"]) for i in range(len(seeds) - 1)]
    noise_mse = max(noise) if noise else float("nan")
    for other in names[1:]:
        diff = float(np.mean([abs(c[other]["runs"][s]["mse"] - base[s]["mse"]) for s in seeds]))
        rel = diff / float(np.mean([base[s]["mse"] for s in seeds]))
        verdict = "within" if diff <= noise_mse else "OUTSIDE"
        print(
            f"  {other} vs {names[0]}: held-out MSE differs by {diff:.3g} ({rel:.2%}) at the same seed; "
            f"run-to-run noise ({names[0]}, seeds {','.join(map(str, seeds))}): {noise_mse:.3g} -> {verdict} noise"
        )
