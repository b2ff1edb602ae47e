"""Shared fixtures: real sample photographs, a local Ray cluster, scratch work directories."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pipeline.common.tracking  # noqa: E402,F401 - captures the user's MLFLOW_TRACKING_URI before any test sets one

# scikit-image's bundled photographs (no download needed)
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "cat", "immunohistochemistry")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) uint8 (grayscale/bool ones expanded to RGB)."""
    from pipeline.common.photos import sample_photo_rgb

    return sample_photo_rgb(name)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """A few real photographs, RGB uint8."""
    return {n: load_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket")}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photographs written as PNG files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse"):
        Image.fromarray(load_photo(n)).save(d / f"{n}.png")
    return d


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster (2 CPUs), shared by the tests of a session; re-initialised if a test shut it down."""
    import ray

    from pipeline.common.tasks import init_ray

    init_ray(num_cpus=2)
    yield ray
    # left running for other modules; stopped at the end of the session (pytest_sessionfinish below)


@pytest.fixture
def ray_up(ray_local):
    """Ensure Ray is initialised for this test (another test may have shut it down)."""
    from pipeline.common.tasks import init_ray

    init_ray(num_cpus=2)
    return ray_local


@pytest.fixture(scope="session")
def paired(tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict[str, str]:
    """The paired image set + tiny-clip-64 cache (and a second set with other pixels) of ``tests.builders``."""
    from tests.builders import paired_data

    return paired_data(str(tmp_path_factory.getbasetemp() / "spar-distill-data"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, paired) -> dict:
    """One finished distill run, shared by every test that only reads its results (the MLflow structure, the
    distill benchmark's figures, evaluations of a trained student): the held-out set's cache computed with a run
    recording its cost, a 1-worker Ray Train run of 6 steps (metrics logged every step, the student registered),
    then a fidelity and a speed evaluation as children of the training run."""
    from pipeline.cache.config import PrecomputeConfig
    from pipeline.cache.precompute import precompute
    from pipeline.eval.benchmark import run_eval
    from pipeline.eval.config import FidelityConfig, SpeedConfig
    from pipeline.train.config import DistillConfig
    from pipeline.train.driver import distill
    from tests.builders import FINISHED_EXPERIMENT, FINISHED_MODEL, FINISHED_STEPS

    wd = tmp_path_factory.mktemp("finished-run")
    held_cache = precompute(
        PrecomputeConfig(images=paired["other"], teacher="tiny-clip-64", crop=64, stride=32, workdir=str(wd),
                         experiment=FINISHED_EXPERIMENT, cache_root=str(wd / "cache"), progress=False)
    )  # fmt: skip
    res = distill(
        DistillConfig(images=paired["images"], cache=paired["cache"], workdir=str(wd),
                      experiment=FINISHED_EXPERIMENT, workers=1, max_steps=FINISHED_STEPS, checkpoint_every=3,
                      log_every=1, lr=1e-3, loader_workers=0, shuffle_buffer=2, register_model=FINISHED_MODEL)
    )  # fmt: skip
    common = dict(workdir=str(wd), experiment="spar-eval")  # the evals nest under the training run anyway
    fid = run_eval(FidelityConfig(images=paired["other"], teacher_cache=held_cache,
                              checkpoint=res.checkpoint_dir, classes="sky;cat;person", overlays=1, **common))  # fmt: skip
    run_eval(SpeedConfig(backbone="tiny-clip-64", resolutions=(128,), strides=(32, 128), repeats=1,
                        parent_run=res.run_id, **common))  # fmt: skip
    return {"wd": wd, "data": paired, "held_cache": held_cache, "res": res, "fid": fid}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop this process's Ray driver (if a test started one) before pytest reports and the interpreter exits.

    Left to Ray's atexit handler, its background threads (log monitor, gRPC) were still running while the interpreter
    finalised; one whole slow-suite run out of three then ended in a segfault (exit 139) after all 26 tests had
    passed. An explicit shutdown here, while the interpreter is whole, stops them first.
    """
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
