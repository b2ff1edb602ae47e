"""The distillation plan: every value a run uses, resolved once by the driver, handed to every Ray Train worker and
logged as the MLflow run's params.

:class:`DistillPlan` is the run's :class:`DistillConfig` with every value the config left open resolved (``student``
is the backbone name even when the config left it to the cache, ``crop``/``stride`` are the teacher window,
``backbone_seed`` the seed, ``gpus_per_worker`` what each worker gets, paths absolute) plus what is derived from it
(the cache fingerprint, the patch size, the step counts); ``plan.lr`` reads ``plan.config.lr``. The run's params
and what the workers do are the same thing. :class:`RunLink` says where the workers report (the MLflow run, the
driver's progress bar); it is not a parameter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from pipeline.train.config import DistillConfig, DistillError

if TYPE_CHECKING:
    from pipeline.cache.spec import CacheSpec

__all__ = ["DistillPlan", "RunLink", "make_plan", "resolve_student", "teacher_window"]


@dataclass(frozen=True)
class DistillPlan:
    """One distillation run, resolved (see the module docstring). The config's field names and the derived ones
    are the run's MLflow param names."""

    config: DistillConfig  # resolved: no value left to the cache, the cluster or a default
    cache_fingerprint: str  # "" without a cache
    patch_size: int
    total_steps: int  # optimizer steps of the whole run
    steps_per_epoch: int

    def __getattr__(self, name: str) -> Any:
        """The config's values read as the plan's own (``plan.lr``)."""
        if name.startswith("__") or name == "config":  # copy and pickle probe before ``config`` is set
            raise AttributeError(name)
        return getattr(self.config, name)

    @property
    def base_weights(self) -> str | None:
        """``pretrained`` as :func:`spar_core.backbones.build_backbone` takes it (None = random seeded)."""
        return None if self.config.pretrained == "none" else self.config.pretrained

    def params(self) -> dict[str, str]:
        """The MLflow params of the run: every config field and every derived value as a string."""
        derived = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return {k: str(v) for k, v in (asdict(self.config) | derived).items()}

    def checkpoint_config(self) -> dict[str, Any]:
        """What a student checkpoint's ``config.json`` records: the resolved config and the step counts."""
        return {
            "config": asdict(self.config),
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }


@dataclass(frozen=True)
class RunLink:
    """Where the workers report: the MLflow run (rank 0's metrics) and the driver's progress actor."""

    run_id: str
    tracking_uri: str
    progress_actor: str = ""  # named Ray actor of the driver's progress bar ("" = none)


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


def teacher_window(cfg: DistillConfig, spec: CacheSpec | None, native_size: int) -> tuple[int, int]:
    """(crop, stride) of the teacher: the config's, else the cache spec's, else the backbone's native size and
    the paper's 24 px stride (the online teacher without a cache)."""
    crop = cfg.crop or (spec.crop if spec is not None else native_size)
    # imported here: this module is unpickled by Ray Train's controller, which must not import torch for it
    from spar_core.sliding import default_stride

    stride = cfg.stride or (spec.stride if spec is not None else default_stride(crop))
    return crop, stride


def make_plan(cfg: DistillConfig, **resolved: Any) -> DistillPlan:
    """The plan: ``cfg`` with the ``resolved`` values in place of what it left open, plus the derived ones."""
    derived = {f.name for f in fields(DistillPlan)} - {"config"}
    # a name that is neither derived nor a config field: replace's TypeError names it
    config = replace(cfg, **{k: v for k, v in resolved.items() if k not in derived})
    return DistillPlan(config, **{k: v for k, v in resolved.items() if k in derived})
