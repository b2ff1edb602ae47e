"""``spar distill``'s configuration (TOML section ``[distill]``) and its user-facing error: light, no torch/Ray.

The config says what the user asked for (``student = ""``: the cache teacher's; ``crop = 0``: the cache's ...);
:mod:`pipeline.train.plan` turns it into the resolved plan the workers run and the MLflow run logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.common.config import ConfigError
from pipeline.common.errors import UserError
from pipeline.common.local import EXECUTORS, runs_in_process

__all__ = ["DistillConfig", "DistillError", "trains_in_process"]

_RUN_NAME_OK = re.compile(r"[A-Za-z0-9._-]{1,128}")


class DistillError(UserError):
    """Distillation cannot start or did not finish (bad inputs, or training failed beyond its retries)."""


@dataclass
class DistillConfig:
    """Configuration of ``spar distill`` (TOML section ``[distill]``)."""

    images: str = ""  # image-set root
    cache: str = ""  # teacher cache path <cache_root>/<fingerprint> ("" only with teacher_online)
    student: str = ""  # backbone name; "" = the cache's teacher backbone
    pretrained: str = "auto"  # "auto" = the cache teacher's weights; "none" = random seeded; a tag or a file
    backbone_seed: int = -1  # seed of random weights; -1 = the cache teacher's (or 0)
    trainable_blocks: int | Literal["all"] = 2  # the last k blocks are trained; "all": the whole image tower
    lr: float = 2e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    # after warm-up: "constant" (the authors' run: AdamW without a scheduler; "none" is the same) or "cosine" to 0
    schedule: Literal["none", "constant", "cosine"] = "none"
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: pipeline.common.precision.resolve
    epochs: int = 10
    max_steps: int = 0  # > 0: stop after this many optimizer steps (epochs are repeated as needed)
    batch_size: int = 1  # > 1: batches of equal-size images (size buckets)
    shuffle_buffer: int = 64  # sample shuffle buffer per worker
    seed: int = 0  # data order and torch seed
    checkpoint_every: int = 500  # steps between checkpoints (and one at each epoch end)
    # Ray Train keeps this many (older good ones are the fall-back for corrupt ones)
    keep_checkpoints: int = 3
    # accepted, no effect: rank 0 queues every step's metrics and a background thread sends them in batches
    # (pipeline/common/tracking_queue.py), so there is no flush to space out
    log_every: int = 10
    workers: int = 1  # Ray Train workers (DDP ranks)
    cpus_per_worker: int = 1  # Ray CPUs per worker = torch threads
    gpus_per_worker: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    # background decode processes per worker (0 = one decode thread in the trainer); "auto": as many as keep the
    # data wait < 5% of the step (pipeline.data.loader_sizing: the images, the student, GPU or CPU)
    loader_workers: int | Literal["auto"] = 2
    verify_pixels: bool = True  # check every image's pixel sha256 while streaming
    workdir: str = "work"  # MLflow store, Ray results, exported students; s3://… needs MLFLOW_TRACKING_URI
    experiment: str = "spar-distill"
    register_model: str = "spar-student"  # registered MLflow model name ("" = log it, do not register)
    run_name: str = ""  # Ray Train run name ("" = generated); --resume continues the last run of the workdir
    storage_path: str = ""  # Ray Train storage ("" = <workdir>/ray_results); shared/S3 on a cluster
    max_failures: int = 2  # worker-failure restarts (from the last checkpoint)
    teacher_online: bool = False  # compute the teacher inside the loop instead of reading the cache
    crop: int = 0  # online teacher window (0 = the cache's, else the backbone's native size)
    stride: int = 0  # online teacher stride (0 = the cache's, else 24 px: the paper's teacher at every crop)
    window_batch: int = 32  # online teacher windows per forward
    ray_address: str = ""  # "" = local in-process cluster (or RAY_ADDRESS)
    # where the ranks run: "ray" = a Ray Train worker group; "in-process" = the command's own process (one rank, no
    # Ray at all: seconds to the first step); "auto" = in-process for one worker on this machine (no ray_address,
    # no RAY_ADDRESS: not a job on a cluster), else Ray Train
    trainer: Literal["auto", "ray", "in-process"] = "auto"
    # > 0: end the run after this step's checkpoint, as if interrupted (resume continues)
    stop_at_step: int = 0

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        nonneg = ("max_steps", "warmup_steps", "loader_workers", "max_failures", "crop", "stride")
        for name in (*nonneg, "stop_at_step", "trainable_blocks", "shuffle_buffer"):
            if (name, getattr(self, name)) in (("trainable_blocks", "all"), ("loader_workers", "auto")):
                continue
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("distill.lr must be > 0, weight_decay and grad_clip >= 0")
        if self.cpus_per_worker < 1 or self.window_batch < 1:
            raise ConfigError("distill.cpus_per_worker and window_batch must be >= 1")
        if self.trainer not in EXECUTORS:
            raise ConfigError(f"distill.trainer must be auto, ray or in-process, got {self.trainer!r}")
        if self.trainer == "in-process" and self.workers != 1:
            raise ConfigError(
                f"distill.trainer=in-process runs one rank: workers must be 1, got {self.workers}"
            )
        if self.run_name and (not _RUN_NAME_OK.fullmatch(self.run_name) or self.run_name.startswith(".")):
            raise ConfigError(
                f"distill.run_name {self.run_name!r} may only hold letters, digits, '.', '_' and '-' "
                "(it names directories) and must not start with '.'"
            )


def trains_in_process(cfg: DistillConfig) -> bool:
    """Whether the run trains in the command's own process (``cfg.trainer``, "auto" resolved)."""
    return runs_in_process(cfg.trainer, cfg.workers, cfg.ray_address)
