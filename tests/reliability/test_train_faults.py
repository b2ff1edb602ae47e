"""Distillation under real faults, on the session's local Ray cluster (2 CPU workers, DDP over gloo).

* A Ray Train worker process SIGKILLed mid-run (from outside, not an exception: tests/pipeline/test_train.py already
  covers an injected exception and a stop + --resume) is restarted by Ray Train from the last checkpoint, and the
  run ends with the same number of optimizer steps, the same data position (samples seen) and the same weights as
  an uninterrupted run.
* On resume, a missing latest checkpoint and a corrupt previous one are reported and skipped; training continues
  from the newest good one and again ends with the uninterrupted weights. (Unit-level fall-back over corrupt
  directories: tests/pipeline/test_train_checkpoint.py ``test_corrupt_checkpoint_falls_back_to_previous_good``.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.train.config import DistillConfig, DistillError
from pipeline.train.driver import distill
from pipeline.train.state import checkpoint_dir_name

pytestmark = pytest.mark.slow  # four Ray Train runs: well over a minute on the shared 2-core machine

STEPS, EVERY = 40, 4
BASE = dict(workers=2, max_steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=3, lr=1e-3, seed=3,
            shuffle_buffer=4, log_every=1, loader_workers=0, max_failures=2)  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rel-distill")


@pytest.fixture(scope="module")
def reference(rel_imageset, rel_reference_cache, workdir, ray_local):
    """The uninterrupted run: its final training state and exported student weights (copied aside)."""
    cfg = DistillConfig(images=rel_imageset, cache=rel_reference_cache, workdir=str(workdir), run_name="reference",
                        **BASE)  # fmt: skip
    res = distill(cfg)
    assert res.completed and res.steps == STEPS
    keep = workdir / "reference-final"
    shutil.copytree(res.checkpoint_dir, keep / "student")
    shutil.copytree(res.ray_checkpoint, keep / "state")
    return cfg, res, keep


def _weights(d: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "student.safetensors"))


def _position(ray_ckpt: Path | str) -> tuple[int, int, int]:
    s = json.loads((Path(ray_ckpt) / "train_state.json").read_text())
    return s["step"], s["epoch"], s["batch_in_epoch"]


def _assert_same_as_reference(student_dir: str, ray_ckpt: str, keep: Path) -> None:
    assert _position(ray_ckpt) == _position(
        keep / "state"
    )  # same steps, same epoch / batch = same samples seen
    a, b = _weights(keep / "student"), _weights(student_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _train_workers(exclude: set[int] = frozenset()) -> list[psutil.Process]:
    """Live Ray Train worker processes of this session's cluster (not in ``exclude``)."""
    out = []
    for c in psutil.Process(os.getpid()).children(recursive=True):
        if c.pid in exclude:
            continue
        try:
            if " ".join(c.cmdline()).startswith("ray::RayTrainWorker"):
                out.append(c)
        except psutil.Error:
            continue
    return out


def _registered_step(run_dir: Path) -> int:
    """Step of the newest checkpoint Ray Train's controller has registered (0 when none)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        doc = json.loads(snap.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = (doc.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name", "")
    from pipeline.train.state import step_of

    return step_of(latest) or 0


def _wait_for_log(capfd, needle: str, timeout: float = 20.0) -> str:
    """Captured stderr, waiting a little for Ray's forwarded worker logs to arrive."""
    err = ""
    deadline = time.monotonic() + timeout
    while True:
        err += capfd.readouterr().err
        if needle in err or time.monotonic() > deadline:
            return err
        time.sleep(0.5)


def test_worker_sigkilled_mid_run_is_restarted_from_the_last_checkpoint(reference, rel_imageset,
                                                                         rel_reference_cache, workdir, capfd):  # fmt: skip
    cfg, ref, keep = reference
    run = "sigkill"
    cfg = dataclasses.replace(cfg, run_name=run)
    run_dir = workdir / "ray_results" / run
    killed: dict[str, object] = {}
    old = {p.pid for p in _train_workers()}  # left over from earlier runs: not this run's workers

    def killer() -> None:
        # Ray Train counts a checkpoint once its controller has registered it (it polls the workers every ~2 s
        # and then writes checkpoint_manager_snapshot.json); kill as soon as one is registered
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            step = _registered_step(run_dir)
            if step:
                workers = _train_workers(old)
                if workers:
                    victim = workers[-1]
                    killed.update(pid=victim.pid, registered=step)
                    killed["after"] = sorted(p.name for p in run_dir.glob("checkpoint_step*"))
                    os.kill(victim.pid, signal.SIGKILL)
                    return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = distill(cfg)
    t.join(timeout=5)
    assert "pid" in killed, "the worker was never killed"
    assert checkpoint_dir_name(STEPS) not in killed["after"], f"killed too late: {killed['after']}"
    err = _wait_for_log(capfd, "resumed from")
    assert "resumed from" in err, "Ray Train did not restart the workers from a checkpoint"
    assert (
        not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    assert res.completed and res.steps == res.total_steps == ref.steps
    _assert_same_as_reference(res.checkpoint_dir, res.ray_checkpoint, keep)
    # every optimizer step was logged (the restarted steps again): nothing skipped
    from mlflow import MlflowClient

    hist = MlflowClient(res.tracking_uri).get_metric_history(res.run_id, "loss")
    assert sorted({m.step for m in hist}) == list(range(1, STEPS + 1))


def test_corrupt_checkpoints_are_skipped_on_resume(reference, workdir, capfd):
    """The reference run's newest checkpoint gets a flipped byte and the one before loses its checksums (an
    interrupted write); resuming must report both, continue from the newest good one and end with the same
    weights."""
    cfg, _, keep = reference
    run_dir = workdir / "ray_results" / cfg.run_name
    ckpts = sorted(p for p in run_dir.glob("checkpoint_step*") if p.is_dir())
    assert [p.name for p in ckpts] == [checkpoint_dir_name(s) for s in (STEPS - 8, STEPS - 4, STEPS)]
    raw = bytearray((ckpts[-1] / "student.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (ckpts[-1] / "student.safetensors").write_bytes(bytes(raw))  # corrupt
    (ckpts[-2] / "checksums.json").unlink()  # incomplete
    capfd.readouterr()
    res = distill(cfg, resume=True)
    err = _wait_for_log(capfd, f"resumed from {ckpts[0]}")
    assert f"{checkpoint_dir_name(STEPS)} is unusable" in err, err[-3000:]
    assert f"{checkpoint_dir_name(STEPS - 4)} is unusable" in err, err[-3000:]
    assert f"resumed from {ckpts[0]}" in err, err[-3000:]
    assert res.completed and res.steps == STEPS
    _assert_same_as_reference(res.checkpoint_dir, res.ray_checkpoint, keep)


def test_resume_with_another_student_backbone_is_refused(reference, workdir):
    """Runs after the corrupt-checkpoint test (its run is complete again): resuming it with another student
    backbone must be refused, not silently continued from the other backbone's weights."""
    cfg, _, _ = reference
    with pytest.raises(DistillError, match="tiny-clip-64"):
        distill(dataclasses.replace(cfg, student="tiny-clip-224", pretrained="none"), resume=True)


def test_missing_latest_checkpoint_is_skipped_on_resume(reference, workdir, capfd):
    """Runs after the tests above (same run): the newest checkpoint directory is deleted; resume must say so, use
    the newest remaining good one (in a new Ray Train directory: Ray refuses the old one) and end with the same
    weights. Nothing else is deleted."""
    cfg, _, keep = reference
    # the run's newest Ray Train directory: the test above continued the run in a new one (from step 32)
    run_dir = sorted((workdir / "ray_results").glob(f"{cfg.run_name}*"))[-1]
    ckpts = sorted(p for p in run_dir.glob("checkpoint_step*") if p.is_dir())
    assert ckpts[-1].name == checkpoint_dir_name(STEPS)
    shutil.rmtree(ckpts[-1])
    capfd.readouterr()
    res = distill(cfg, resume=True)
    err = _wait_for_log(capfd, f"resumed from {ckpts[-2]}")
    assert f"checkpoint {ckpts[-1]} no longer exists: skipped; resuming from {ckpts[-2]}" in err, err[-3000:]
    assert f"resumed from {ckpts[-2]}" in err, err[-3000:]
    assert res.completed and res.steps == STEPS
    _assert_same_as_reference(res.checkpoint_dir, res.ray_checkpoint, keep)
    assert all(p.is_dir() for p in ckpts[:-1])  # the older checkpoints are kept
    first = workdir / "ray_results" / cfg.run_name  # and so are the first directory's, corrupt ones included
    assert [p.name for p in sorted(first.glob("checkpoint_step*"))] == [
        checkpoint_dir_name(s) for s in (STEPS - 8, STEPS - 4, STEPS)
    ]
