"""Test data builders shared by every suite (the one place for them): real sample photos, synthetic images, small
image sets and tiny teacher caches built with the real stages, and the paired image set + cache that the stream,
train and MLflow tests share. Fixtures that use them live in ``tests/conftest.py``.

Everything is small on purpose (the machine has 2 shared cores): the ``tiny-clip-64`` backbone, crop 64 / stride 32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache.config import PrecomputeConfig
from pipeline.cache.precompute import precompute
from pipeline.common.photos import sample_photo_rgb
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from spar_core.backbones import Backbone, build_backbone
from tests.reliability.faults import start_test_ray

TEACHER = "tiny-clip-64"
CROP, STRIDE = 64, 32
INGEST_SMALL = dict(target_long=192, target_short=128, min_short=64)
PAIRED_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse")
# the session's one finished distill run (``finished_run`` in tests/conftest.py)
FINISHED_EXPERIMENT = "structure"
FINISHED_MODEL = "spar-test-student"
FINISHED_RUN = "resumed"
FINISHED_STEPS = 6
FINISHED_DISTILL = dict(
    precision="fp32",  # the naive reference of tests/pipeline/test_train.py is fp32; auto picks bf16 where faster
    workers=2,
    max_steps=FINISHED_STEPS,
    checkpoint_every=2,
    lr=1e-3,
    seed=3,
    shuffle_buffer=4,
    log_every=1,
    warmup_steps=2,
    schedule="cosine",
    grad_clip=1.0,
    experiment=FINISHED_EXPERIMENT,
    register_model=FINISHED_MODEL,
)


def write_photo_pngs(folder: Path, names: tuple[str, ...]) -> Path:
    """Sample photos (RGB) as ``<name>.png`` files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(sample_photo_rgb(n)).save(folder / f"{n}.png")
    return folder


# ------------------------------------------------------------------------------------------ synthetic images


def synthetic_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: noise plus a few flat rectangles and a disc (so features are not pure noise)."""
    img = rng.integers(0, 64, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = int(rng.integers(y0 + 4, h)), int(rng.integers(x0 + 4, w))
        img[y0:y1, x0:x1] = rng.integers(64, 256, 3, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = h / 2, w / 2, min(h, w) / 4
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def write_synthetic_images(
    d: Path, n: int, size: tuple[int, int] = (96, 128), seed: int = 0, prefix: str = "img"
) -> list[Path]:
    """Write ``n`` synthetic PNGs of ``size`` (h, w) into ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = d / f"{prefix}{i:04d}.png"
        Image.fromarray(synthetic_image(rng, *size)).save(p)
        paths.append(p)
    return paths


def make_imageset(root: Path, n: int, shard_size: int, seed: int = 0, size=(96, 128)) -> str:
    """Ingest ``n`` synthetic images into ``root/set`` (small IngestConfig); returns the image-set root."""
    src = root / "src"
    write_synthetic_images(src, n, size=size, seed=seed)
    out = root / "set"
    ingest(str(src), str(out), IngestConfig(shard_size=shard_size, seed=seed, **INGEST_SMALL), workers=2,
           progress=False)  # fmt: skip
    return str(out)


def precompute_cfg(images: str, cache_root: Path | str, **kw):
    """A PrecomputeConfig for the tiny teacher (float32 forward, so results do not depend on autocast)."""
    base = dict(images=images, teacher=TEACHER, crop=CROP, stride=STRIDE, cache_root=str(cache_root),
                autocast="none", workers=2, window_batch=16, progress=False, max_retries=0)  # fmt: skip
    return PrecomputeConfig(**{**base, **kw})


def precompute_argv(images: str, cache_root: Path | str, *extra: str) -> list[str]:
    """``spar precompute`` arguments matching :func:`precompute_cfg`."""
    return ["precompute", "--images", images, "--teacher", TEACHER, "--crop", str(CROP), "--stride",
            str(STRIDE), "--cache-root", str(cache_root), "--set", "autocast=none", "--set", "progress=false",
            "--set", "max_retries=0", *extra]  # fmt: skip


def tiny_cache(images: str, cache_root: Path | str, **kw) -> str:
    """The tiny teacher's cache of ``images`` (see :func:`precompute_cfg`)."""
    return precompute(precompute_cfg(images, cache_root, **kw))


@functools.cache
def perturbed_student(
    name: str = TEACHER, trainable: int | str = 2, scale: float = 0.05, seed: int = 0, backbone_seed: int = 0
) -> Backbone:
    """A student as training leaves it: the base backbone with its last ``trainable`` blocks (or "all") moved by
    ``scale`` x seeded Gaussian noise and still trainable (what ``save_student`` stores)."""
    bb = build_backbone(name, seed=backbone_seed)
    bb.set_trainable(trainable)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return bb


def paired_data(root: str) -> dict[str, str]:
    """Image set (6 photos, 3 shards of 2, ~128x192 pixels) + its tiny-clip-64 cache, plus a second image set with
    other pixels (for pairing refusals). Built once per session, shared by the stream, train and MLflow tests."""
    base = Path(root)
    src = write_photo_pngs(base / "photos", PAIRED_PHOTOS)
    other_src = base / "photos_other"
    other_src.mkdir(parents=True, exist_ok=True)
    # same keys and sizes as two of the photos above, other pixels for "astronaut"
    Image.fromarray(sample_photo_rgb("camera")).save(other_src / "astronaut.png")
    Image.fromarray(sample_photo_rgb("coffee")).save(other_src / "coffee.png")
    start_test_ray()  # the session's cluster (kept when one is up)
    small = dict(target_long=192, target_short=128, min_short=128)
    ingest(str(src), str(base / "set"), IngestConfig(shard_size=2, **small), workers=2, progress=False)
    ingest(str(other_src), str(base / "other"), IngestConfig(shard_size=2, seed=7, **small), workers=1,
           progress=False)  # fmt: skip
    cache = precompute(
        PrecomputeConfig(images=str(base / "set"), teacher=TEACHER, crop=CROP, stride=STRIDE,
                         cache_root=str(base / "cache"), progress=False)
    )  # fmt: skip
    return {"images": str(base / "set"), "cache": cache, "other": str(base / "other")}


# The tests' object store: one moto S3 server per test process on 127.0.0.1, started on first use. Every test that
# needs S3 gets the same endpoint and credentials, so the Ray tasks' runtime environment (which carries them) is the
# same from test to test, and the session's Ray cluster reuses its warm worker processes for it instead of starting
# new ones (torch and the teacher imported again) for each test's own server.
S3_SECRET = "secret-7f3a9c-never-a-task-argument"  # tests check that it reaches tasks only by the runtime env
_MOTO: list[Any] = []  # [server, endpoint] once started


def moto_endpoint() -> str:
    """The URL of the tests' moto S3 server (started on first use)."""
    if not _MOTO:
        import atexit

        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        atexit.register(server.stop)
        host, port = server.get_host_and_port()
        _MOTO.extend([server, f"http://{host}:{port}"])
    return _MOTO[1]


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """moto's S3 server on 127.0.0.1 with an empty ``bucket``; endpoint and credentials set in this process's
    environment for the duration (as a user would set them). Yields (s3fs filesystem, those environment variables).
    """
    import s3fs

    env = {"AWS_ENDPOINT_URL": moto_endpoint(), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        if fs.exists(bucket):  # an earlier test's bucket of the same name: start empty
            fs.rm(bucket, recursive=True)
        fs.mkdir(bucket)
        try:
            yield fs, env
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def naive_distill(data: dict[str, str], cfg, world: int) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a DistillConfig
    """A distillation of ``world`` ranks as a plain single-process loop (independent reference): each step averages
    the ranks' losses (what DDP's gradient all-reduce computes), images and targets read independently
    (ImageSet.read, TeacherCache.features); the trainable weights after ``cfg.max_steps`` steps."""
    from pipeline.cache.reader import open_cache
    from pipeline.data.imageset import open_imageset
    from pipeline.train.step import lr_at
    from pipeline.train.stream import Planner, refs_from_imageset

    ims, cache = open_imageset(data["images"]), open_cache(data["cache"])
    planner = Planner(
        refs_from_imageset(ims), seed=cfg.seed, world_size=world, shuffle_buffer=cfg.shuffle_buffer
    )
    bb = build_backbone("tiny-clip-64", seed=0)
    bb.set_trainable(cfg.trainable_blocks)
    params = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    positions = planner.positions(0, 0)
    for step in range(cfg.max_steps):
        epoch, b = next(positions)
        losses = []
        for rank in range(world):
            (ref,) = planner.batches(epoch, rank)[b]
            x = bb.normalize(torch.from_numpy(np.array(ims.read(ref.key)))[None])
            t = torch.from_numpy(np.asarray(cache.features(ref.key), dtype=np.float32))[None]
            losses.append((bb.dense(x) - t).pow(2).mean())
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.max_steps)
        opt.zero_grad()
        (sum(losses) / world).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return {k: v.clone() for k, v in bb.trainable_state_dict().items()}


def assert_same_trainable(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], cfg) -> None:  # noqa: ANN001
    """``got`` equals the reference weights ``ref`` of a run of ``cfg`` (a DistillConfig), to float tolerance."""
    assert got.keys() == ref.keys()
    for k in ref:
        a, b = got[k].clone(), ref[k].clone()
        if k.endswith("attn.in_proj_bias"):
            # The key bias has an exactly-zero true gradient (softmax is shift invariant), so its computed gradient
            # is rounding noise that Adam normalises to +-lr steps: compare it only for staying within lr * steps.
            d = a.shape[0] // 3
            assert float((a[d : 2 * d] - b[d : 2 * d]).abs().max()) <= 2 * cfg.lr * cfg.max_steps
            a[d : 2 * d] = b[d : 2 * d]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
