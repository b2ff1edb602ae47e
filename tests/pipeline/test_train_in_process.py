"""``spar distill`` of one worker in the command's own process (``trainer``: auto resolves to it for one worker on this
machine), not on a Ray Train worker group: the same training, checkpoints, resume and restarts.

The reference is a plain single-process loop (``tests.builders.naive_distill``, one rank), written independently of
the pipeline's data stream, step runner and checkpoint code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline.train.config import DistillConfig, trains_in_process
from pipeline.train.driver import distill
from pipeline.train.run_dir import RAY_SNAPSHOT_FILE
from pipeline.train.state import checkpoint_dir_name
from pipeline.train.step import StepRunner
from tests.builders import FINISHED_DISTILL, assert_same_trainable, naive_distill

BASE = {k: v for k, v in FINISHED_DISTILL.items() if k not in ("experiment", "register_model", "workers")}


def test_auto_trains_in_process_only_for_one_worker_without_a_cluster_address(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert trains_in_process(DistillConfig())
    assert not trains_in_process(DistillConfig(workers=2))
    assert not trains_in_process(DistillConfig(ray_address="ray://head:10001"))
    assert not trains_in_process(DistillConfig(trainer="ray"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a job on a cluster
    assert not trains_in_process(DistillConfig())
    assert trains_in_process(DistillConfig(trainer="in-process"))


def test_stopped_resumed_and_failed_in_process_run_equals_a_naive_loop(paired, tmp_path: Path, monkeypatch,
                                                                       capfd) -> None:  # fmt: skip
    """Stop after step 3 (decoding in a loader process), resume (decoding in the trainer) with one failure after
    step 5 (restarted from the step-4 checkpoint) == 6 uninterrupted steps of the naive loop."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    wd = tmp_path / "wd"
    cfg = DistillConfig(images=paired["images"], cache=paired["cache"], workdir=str(wd), run_name="here",
                        loader_workers=1, stop_at_step=3, keep_checkpoints=2, experiment="in-process",
                        register_model="", **BASE)  # fmt: skip
    first = distill(cfg)
    assert (first.steps, first.completed) == (3, False)

    fired: list[int] = []
    step = StepRunner.step

    def failing_step(self, item, i):  # noqa: ANN001, ANN202 - StepRunner.step's signature
        out = step(self, item, i)
        if i + 1 == 5 and not fired:
            fired.append(i + 1)
            raise RuntimeError("injected failure after step 5")
        return out

    monkeypatch.setattr(StepRunner, "step", failing_step)
    res = distill(dataclasses.replace(cfg, stop_at_step=0, loader_workers=0), resume=True)
    assert fired == [5] and res.completed and res.steps == 6 == res.total_steps
    err = capfd.readouterr().err
    assert "restarting from the last checkpoint (1 of 2 restarts)" in err
    assert f"resumed from {wd / 'ray_results' / 'here' / checkpoint_dir_name(4)} at step 4" in err

    assert_same_trainable(load_file(str(Path(res.checkpoint_dir) / "student.safetensors")),
                          naive_distill(paired, cfg, world=1), cfg)  # fmt: skip
    run_dir = wd / "ray_results" / "here"
    assert not (run_dir / RAY_SNAPSHOT_FILE).exists()  # no Ray Train run wrote here
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [checkpoint_dir_name(4), checkpoint_dir_name(6)], (
        names
    )  # keep_checkpoints, nothing staged left
    run = MlflowClient(res.tracking_uri).get_run(res.run_id)
    assert run.data.params["trainer"] == "in-process" and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(res.tracking_uri).get_metric_history(res.run_id, "loss")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_in_process_refuses_more_than_one_worker() -> None:
    from pipeline.common.config import ConfigError

    with pytest.raises(ConfigError, match="trainer=in-process runs one rank: workers must be 1, got 2"):
        DistillConfig(trainer="in-process", workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("in-process", "ray"), ("ray", "in-process")])
def test_a_run_resumes_across_trainers(
    paired, tmp_path: Path, monkeypatch, capfd, first: str, then: str
) -> None:
    """Stopped after step 3 by one trainer, resumed by the other: the other starts from that checkpoint (Ray Train
    has no record of an in-process run's checkpoints; an in-process rank reads Ray Train's directory) and ends with
    the naive loop's weights."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    wd = tmp_path / "wd"
    cfg = DistillConfig(images=paired["images"], cache=paired["cache"], workdir=str(wd), run_name="across",
                        loader_workers=0, stop_at_step=3, experiment="across", register_model="", trainer=first,
                        **BASE)  # fmt: skip
    assert distill(cfg).steps == 3
    res = distill(dataclasses.replace(cfg, stop_at_step=0, trainer=then), resume=True)
    assert res.completed and res.steps == 6
    assert f"{checkpoint_dir_name(3)} at step 3" in capfd.readouterr().err
    assert_same_trainable(load_file(str(Path(res.checkpoint_dir) / "student.safetensors")),
                          naive_distill(paired, cfg, world=1), cfg)  # fmt: skip
