"""The distillation plan: every value a run uses, resolved once by the driver, handed to every Ray Train worker and
logged as the MLflow run's params.

:class:`DistillPlan` has one field per parameter, holding the value used (``student`` is the backbone name even
when the config left it to the cache, ``crop``/``stride`` are the teacher window, ``backbone_seed`` the seed,
``gpus_per_worker`` what each worker gets), so the run's params and what the workers do are the same thing.
:class:`RunLink` says where the workers report (the MLflow run, the driver's progress bar); it is not a parameter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pipeline.train.config import DistillConfig, DistillError

if TYPE_CHECKING:
    from pipeline.cache.spec import CacheSpec

__all__ = ["DistillPlan", "RunLink", "make_plan", "resolve_student", "teacher_window"]

CONFIG_FIELDS = tuple(f.name for f in fields(DistillConfig))


@dataclass(frozen=True)
class DistillPlan:
    """One distillation run, resolved (see the module docstring). Field names are the run's MLflow param names."""

    # inputs (absolute paths)
    images: str
    cache: str  # "" with the online teacher and no cache
    cache_fingerprint: str  # "" without a cache
    # the student
    student: str  # backbone name
    pretrained: str  # base weights: an open_clip tag or a file, "none" = random seeded
    backbone_seed: int
    patch_size: int
    trainable_blocks: int | Literal["all"]
    # optimisation
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: Literal["none", "constant", "cosine"]
    grad_clip: float
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto is resolved on each worker's device
    epochs: int
    max_steps: int
    total_steps: int  # optimizer steps of the whole run
    steps_per_epoch: int
    stop_at_step: int
    # data
    batch_size: int
    shuffle_buffer: int
    seed: int
    loader_workers: int
    verify_pixels: bool
    # the teacher
    teacher_online: bool
    crop: int
    stride: int
    window_batch: int
    # checkpoints and logging
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    # the cluster and where things go
    workers: int
    cpus_per_worker: int
    gpus_per_worker: float
    max_failures: int
    ray_address: str
    workdir: str
    experiment: str
    register_model: str
    run_name: str
    storage_path: str

    @property
    def base_weights(self) -> str | None:
        """``pretrained`` as :func:`spar_core.backbones.build_backbone` takes it (None = random seeded)."""
        return None if self.pretrained == "none" else self.pretrained

    def params(self) -> dict[str, str]:
        """The MLflow params of the run: every field as a string."""
        return {k: str(v) for k, v in asdict(self).items()}

    def checkpoint_config(self) -> dict[str, Any]:
        """What a student checkpoint's ``config.json`` records: the resolved config and the step counts."""
        plan = asdict(self)
        return {
            "config": {k: plan[k] for k in CONFIG_FIELDS},
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }


@dataclass(frozen=True)
class RunLink:
    """Where the workers report: the MLflow run (rank 0's metrics) and the driver's progress actor."""

    run_id: str
    tracking_uri: str
    progress_actor: str = ""  # named Ray actor of the driver's progress bar ("" = none)


class _WindowSpec(Protocol):
    crop: int
    stride: int


def resolve_student(cfg: DistillConfig, spec: CacheSpec | None) -> tuple[str, str, int]:
    """(backbone name, pretrained or "none", seed) of the student: by default the cache teacher's."""
    name = cfg.student or (spec.backbone if spec else "")
    if not name:
        raise DistillError(
            "distill: no student backbone (pass --student, or a --cache whose teacher is used)"
        )
    same = spec is not None and name == spec.backbone
    if cfg.pretrained == "auto":
        pretrained = (spec.pretrained if same else None) or "none"
    elif cfg.pretrained.lower() == "none":
        pretrained = "none"
    else:
        pretrained = cfg.pretrained
    seed = cfg.backbone_seed
    if seed < 0:
        # imported here: this module is unpickled by Ray Train's controller, which must not import torch for it
        from spar_core.backbones import random_weights_seed

        seed = (random_weights_seed(spec.weights_id) if same else None) or 0
    return name, pretrained, seed


def teacher_window(cfg: DistillConfig, spec: _WindowSpec | None, native_size: int) -> tuple[int, int]:
    """(crop, stride) of the teacher: the config's, else the cache spec's, else the backbone's native size and
    the paper's 24 px stride (the online teacher without a cache)."""
    crop = cfg.crop or (spec.crop if spec is not None else native_size)
    # imported here: this module is unpickled by Ray Train's controller, which must not import torch for it
    from spar_core.sliding import default_stride

    stride = cfg.stride or (spec.stride if spec is not None else default_stride(crop))
    return crop, stride


def make_plan(cfg: DistillConfig, **resolved: Any) -> DistillPlan:
    """The plan: ``cfg`` with the ``resolved`` values in place of what it left open, plus the derived ones."""
    unknown = set(resolved) - {f.name for f in fields(DistillPlan)}
    if unknown:
        raise TypeError(f"make_plan: not plan fields: {sorted(unknown)}")
    return DistillPlan(**{**asdict(cfg), **resolved})
