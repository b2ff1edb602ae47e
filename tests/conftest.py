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


# The session's Ray cluster, started in a background thread while pytest imports the test modules (~10 s on one
# core, with the other idle), when a whole run (no paths given) is about to need it anyway: the ``spar`` command's
# early start (pipeline.common.tasks), with the test fault hook. Every init_ray waits for it.
def pytest_collection(session: pytest.Session) -> None:
    cfg = session.config
    whole_run = not cfg.args or [Path(a).resolve() for a in cfg.args] == [Path(str(cfg.rootpath), "tests")]
    xdist_controller = getattr(cfg.option, "dist", "no") != "no" and not hasattr(cfg, "workerinput")
    if (
        not whole_run
        or xdist_controller
        or cfg.option.collectonly
        or os.environ.get("SPAR_TEST_EARLY_RAY") == "0"
    ):
        return
    from pipeline.common.tasks import start_local_cluster_early
    from tests.reliability.faults import start_test_ray

    faults = Path(str(cfg._tmp_path_factory.getbasetemp())) / "faults"  # ray_local's folder
    start_local_cluster_early(start=lambda: start_test_ray(fault_dir=faults))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray cluster (2 CPUs) with the test fault hook (tests/reliability/faults.py), shared by the tests of a
    session; re-initialised if a test shut it down."""
    import ray

    from tests.reliability.faults import start_test_ray

    start_test_ray(fault_dir=tmp_path_factory.getbasetemp() / "faults")
    yield ray
    # left running for other modules; stopped at the end of the session (pytest_sessionfinish below)


@pytest.fixture
def ray_up(ray_local):
    """Ensure Ray is initialised for this test (another test may have shut it down)."""
    from tests.reliability.faults import start_test_ray

    start_test_ray()
    return ray_local


@pytest.fixture(scope="session")
def paired(tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict[str, str]:
    """The paired image set + tiny-clip-64 cache (and a second set with other pixels) of ``tests.builders``."""
    from tests.builders import paired_data

    return paired_data(str(tmp_path_factory.getbasetemp() / "spar-distill-data"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, paired) -> dict:
    """The session's one finished distill run, shared by every test that only reads its results (training itself,
    the MLflow structure, the distill benchmark's figures, evaluations of a trained student):

    - the held-out set's cache, computed with a run that records its cost;
    - a 2-worker Ray Train run (DDP over gloo) of ``FINISHED_STEPS`` steps, stopped after step 3 (decoding in a
      forkserver loader worker), then continued with ``resume=True`` (decoding in the training process), during
      which the last rank raises once after step 5 and Ray Train restarts the group from the step-4 checkpoint;
      the finished student is registered;
    - a fidelity and a speed evaluation as children of the training run.

    Keys: ``wd``, ``data`` (``paired``), ``held_cache``, ``cfg`` (the continuation's config), ``first`` and ``res``
    (the two DistillResults), ``fid``."""
    import dataclasses

    from pipeline.cache.config import PrecomputeConfig
    from pipeline.cache.precompute import precompute
    from pipeline.eval.benchmark import run_eval
    from pipeline.eval.config import FidelityConfig, SpeedConfig
    from pipeline.train.config import DistillConfig
    from pipeline.train.driver import distill
    from tests.builders import FINISHED_DISTILL, FINISHED_EXPERIMENT, FINISHED_RUN
    from tests.reliability.train_faults import fail_once_at_step

    wd = tmp_path_factory.mktemp("finished-run")
    held_cache = precompute(
        PrecomputeConfig(images=paired["other"], teacher="tiny-clip-64", crop=64, stride=32, workdir=str(wd),
                         experiment=FINISHED_EXPERIMENT, cache_root=str(wd / "cache"), progress=False)
    )  # fmt: skip
    cfg = DistillConfig(images=paired["images"], cache=paired["cache"], workdir=str(wd), run_name=FINISHED_RUN,
                        loader_workers=1, stop_at_step=3, **FINISHED_DISTILL)  # fmt: skip
    first = distill(cfg)
    cfg = dataclasses.replace(cfg, stop_at_step=0, loader_workers=0)
    with fail_once_at_step(5, wd / "distill" / FINISHED_RUN):  # the last rank raises once after step 5
        res = distill(cfg, resume=True)
    common = dict(workdir=str(wd), experiment="spar-eval")  # the evals nest under the training run anyway
    fid = run_eval(FidelityConfig(images=paired["other"], teacher_cache=held_cache,
                              checkpoint=res.checkpoint_dir, classes="sky;cat;person", overlays=1, **common))  # fmt: skip
    run_eval(SpeedConfig(backbone="tiny-clip-64", resolutions=(128,), strides=(32, 128), repeats=1,
                        parent_run=res.run_id, **common))  # fmt: skip
    return {"wd": wd, "data": paired, "held_cache": held_cache, "cfg": cfg, "first": first, "res": res,
            "fid": fid}  # fmt: skip


# --------------------------------------------------------------------- running on two workers (pytest-xdist)

# The modules that take longest (docs/testing.md), handed out first so that the workers finish together; the rest
# follow in collection order. Only with `--dist loadgroup --no-loadscope-reorder` (`SPAR_TEST_WORKERS=N bash
# scripts/test.sh`).
LONGEST_FIRST = (
    "tests/pipeline/test_precompute.py",
    "tests/pipeline/test_workflow_s3.py",
    "tests/cluster/test_cluster.py",
    "tests/pipeline/test_ingest.py",
    "tests/e2e/test_infra.py",
    "tests/reliability/test_precompute_faults.py",
    "tests/pipeline/test_dinov3txt_pipeline.py",
    "tests/reliability/test_bad_input.py",
)
FINISHED_RUN_GROUP = (
    "finished-run"  # every module that reads the session's finished run: one worker runs it once
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which names each test's group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``: one group per test module (its module fixtures are made once), the modules that
    read ``finished_run`` in one group (the run is made once), the finished run's group and the longest modules
    first."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    shared = {item.path for item in items if "finished_run" in item.fixturenames}
    root = Path(str(config.rootpath))
    rank: dict[str, int] = {}  # item id -> 0 the finished run's group, 1.. the longest modules, then the rest
    for item in items:
        rel = item.path.relative_to(root).as_posix()
        item.add_marker(pytest.mark.xdist_group(FINISHED_RUN_GROUP if item.path in shared else rel))
        order = LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)
        rank[item.nodeid] = 0 if item.path in shared else 1 + order
    items.sort(key=lambda item: rank[item.nodeid])  # stable: collection order within a rank


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop this process's Ray driver (if a test started one) before pytest reports and the interpreter exits.

    Left to Ray's atexit handler, its background threads (log monitor, gRPC) were still running while the interpreter
    finalised; one whole slow-suite run out of three then ended in a segfault (exit 139) after all 26 tests had
    passed. An explicit shutdown here, while the interpreter is whole, stops them first.
    """
    import sys

    if "ray" in sys.modules:
        from pipeline.common.tasks import shutdown_ray

        shutdown_ray()  # waits for an early start, and lets its thread end
