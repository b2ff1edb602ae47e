"""The training-state format: a training checkpoint (what Ray Train stores every N steps) is a student checkpoint
(:mod:`pipeline.student.format`) plus

* ``train_state.safetensors`` -- optimizer tensors (``opt.<param index>.<name>``) and torch RNG states;
* ``train_state.json`` -- step, epoch, data position, optimizer param groups, scaler and python/numpy RNG
  states, anything else JSON-able;

and ``checksums.json`` over all of them, written last. No pickle anywhere.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.student.format import (
    BACKBONE_FILE,
    FORMAT_VERSION,
    STUDENT_FILE,
    CheckpointError,
    StudentMeta,
    read_local_json,
    verify_checkpoint,
    write_checksums,
    write_json,
    write_student_files,
)
from spar_core.backbones import Backbone

STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"


@dataclass
class TrainState:
    """Everything needed to continue training exactly where a checkpoint left off."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    scaler: dict[str, Any] | None = None  # GradScaler state_dict (fp16 only)
    rng: dict[str, Any] = field(default_factory=dict)  # see capture_rng / restore_rng
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able (run ids, metrics, world size ...)


def capture_rng() -> dict[str, Any]:
    """Snapshot torch (CPU, CUDA), numpy and python RNG states."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    np_state = np.random.get_state()
    rng["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    py = random.getstate()
    rng["python"] = [py[0], list(py[1]), py[2]]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of capture_rng (missing entries are left alone)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "python" in rng:
        p = rng["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def _split_optimizer(opt_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    bb: Backbone, out_dir: str | os.PathLike, state: TrainState, student: StudentMeta
) -> Path:
    """Write a full training checkpoint into ``out_dir`` (created; must not hold another checkpoint)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_student_files(bb, d, student)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION}
    if state.optimizer is not None:
        tensors, meta["optimizer"] = _split_optimizer(state.optimizer)
    rng_json = {}
    for k, v in state.rng.items():
        if k == "torch":
            tensors["rng.torch"] = v.contiguous()
        elif k == "cuda":
            for i, s in enumerate(v):
                tensors[f"rng.cuda.{i}"] = s.contiguous()
            rng_json["cuda_count"] = len(v)
        else:
            rng_json[k] = v
    save_file(tensors, str(d / STATE_TENSORS_FILE), metadata={"format": "spar-train-state"})
    meta.update(
        step=state.step,
        epoch=state.epoch,
        batch_in_epoch=state.batch_in_epoch,
        scaler=state.scaler,
        rng=rng_json,
        extra=state.extra,
    )
    write_json(d / STATE_JSON_FILE, meta)
    write_checksums(d)
    return d


def load_training_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Verify and read a training checkpoint: (TrainState, trainable weights). Raises CheckpointError."""
    d = Path(ckpt_dir)
    verify_checkpoint(d, required=(STUDENT_FILE, BACKBONE_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE))
    meta = read_local_json(d / STATE_JSON_FILE)
    try:
        tensors = load_file(str(d / STATE_TENSORS_FILE), device="cpu")
        weights = load_file(str(d / STUDENT_FILE), device="cpu")
    except Exception as e:
        raise CheckpointError(f"checkpoint {d}: cannot read tensors ({e})") from None
    rng: dict[str, Any] = {k: v for k, v in meta.get("rng", {}).items() if k != "cuda_count"}
    if "rng.torch" in tensors:
        rng["torch"] = tensors["rng.torch"]
    n_cuda = int(meta.get("rng", {}).get("cuda_count", 0))
    if n_cuda:
        rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(n_cuda)]
    opt = _join_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
    state = TrainState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_in_epoch=int(meta["batch_in_epoch"]),
        optimizer=opt,
        scaler=meta.get("scaler"),
        rng=rng,
        extra=meta.get("extra", {}),
    )
    return state, weights


def checkpoint_dir_name(step: int) -> str:
    """Name of the Ray Train checkpoint directory for ``step`` (sortable)."""
    return f"checkpoint_step{step:09d}"


def step_of(name: str) -> int | None:
    """Inverse of checkpoint_dir_name; None for other names."""
    digits = name.removeprefix("checkpoint_step")
    return int(digits) if digits != name and digits.isdigit() else None
