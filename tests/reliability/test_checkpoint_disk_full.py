"""A full disk while a training checkpoint is written (docs/reliability.md), slow; in the command's own process and
on Ray Train.

The fault is real: the run's storage is a size-limited tmpfs (root can mount one) with room for the run's own files,
the first checkpoint and half of the second, so the second checkpoint's upload hits ``ENOSPC`` part-way. The
reference is the same distillation on an ordinary folder, uninterrupted.

Checked: ``spar distill`` exits 2 with one line naming the storage, the checkpoint kept and ``--resume``; the first
checkpoint is still whole (it loads, checksums pass); after the disk is grown, ``spar distill --resume`` continues
from it and ends with the reference's weights.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.train.config import DistillConfig
from pipeline.train.driver import distill
from pipeline.train.run_dir import checkpoints_newest_first, newest_good
from pipeline.train.state import checkpoint_dir_name
from tests.builders import paired_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

STEPS = 8
SETS = dict(precision="fp32", workers=1, max_steps=STEPS, checkpoint_every=2, keep_checkpoints=2, lr=1e-3, seed=3,
            shuffle_buffer=4, log_every=1, loader_workers=0, register_model="", max_failures=0)  # fmt: skip
PAGE = 4096


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local) -> dict[str, str]:
    return paired_data(str(tmp_path_factory.getbasetemp() / "spar-diskfull-data"))


@pytest.fixture(scope="module", params=["in-process", "ray"])
def reference(request, data, tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path, str]:
    """The uninterrupted run on an ordinary folder, in the command's process or on Ray Train: its final weights,
    its run directory and the trainer."""
    wd = tmp_path_factory.mktemp("diskfull-ref")
    res = distill(DistillConfig(images=data["images"], cache=data["cache"], workdir=str(wd), run_name="ref",
                                trainer=request.param, **SETS))  # fmt: skip
    assert res.completed and res.steps == STEPS
    run_dir = wd / "ray_results" / "ref"
    return load_file(str(Path(res.checkpoint_dir) / "student.safetensors")), run_dir, request.param


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Callable[[int], None]]]:
    """A tmpfs at tmp_path/disk; yields (path, resize(bytes))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size: int, remount: bool = True) -> None:
        opts = f"size={size}" + (",remount" if remount else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode:
            if not remount:
                pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.strip()})")
            raise AssertionError(r.stderr)

    mount(64 * 1024**2, remount=False)
    try:
        yield mnt, mount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _pages(path: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) for p in path.rglob("*") if p.is_file())


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_resume_finishes_the_run(
    data, reference, tmpfs, tmp_path: Path, capsys
) -> None:
    from pipeline.cli import main

    want, ref_run, trainer = reference
    mnt, resize = tmpfs
    ckpt_pages = max(_pages(p) for p in ref_run.iterdir() if p.is_dir()) + 2  # + the directories' own pages
    other_pages = _pages(ref_run) - sum(_pages(p) for p in ref_run.iterdir() if p.is_dir())
    resize(PAGE * (other_pages + 4 + ckpt_pages + ckpt_pages // 2))
    wd = tmp_path / "wd"
    argv = ["distill", "--images", data["images"], "--cache", data["cache"], "--workdir", str(wd),
            *[a for k, v in {**SETS, "run_name": "full", "storage_path": str(mnt), "trainer": trainer}.items()
              for a in ("--set", f"{k}={v}")]]  # fmt: skip
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("spar distill: error:")]
    assert len(err) == 1, err
    line = err[0]
    first = mnt / "full" / checkpoint_dir_name(2)
    assert "no space left on the device" in line and str(mnt / "full") in line, line
    assert f"the last good checkpoint is kept ({first})" in line and "--resume" in line, line
    # the first checkpoint is whole: the restore takes it (checksums checked), the cut one is reported unusable
    logged: list[str] = []
    assert newest_good(checkpoints_newest_first([str(mnt / "full")]), log=logged.append) == str(first)
    print(f"DISK-FULL checkpoint {ckpt_pages * PAGE} bytes, tmpfs {(other_pages + 4 + ckpt_pages * 3 // 2) * PAGE} "
          f"bytes; unusable: {logged}")  # fmt: skip
    resize(64 * 1024**2)  # space again
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err[-3000:]
    got = load_file(str(wd / "students" / "full" / "student.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
