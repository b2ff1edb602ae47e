"""Losing a whole worker node mid-job on a cluster with no shared disk: every piece of state on S3 (moto),
the job submitted with `spar submit`, one worker node SIGKILLed at once (its raylet, agents and Ray workers).

The figures of each recovery (what was killed and when, what was in flight on it, what was recomputed, how long
the recovery took) are printed as one ``NODE-LOSS`` line per test, also under pytest's capture.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.builders import write_synthetic_images
from tests.cluster.conftest import BUCKET, Cluster
from tests.e2e.conftest import ROOT, SPAR, clean_env, run_spar

pytestmark = pytest.mark.slow  # three Ray nodes, minutes of work

# precompute: a teacher and window grid heavy enough that the job runs long enough to lose a node in the middle
# (16 images of 320x448, 8 shards, ~105 windows of 224 px per image); float32 forward, one thread per task, so a
# shard's features do not depend on where it ran
N_IMAGES, SHARD_SIZE = 16, 2
PRECOMPUTE_ARGS = ["--teacher", "small-clip-224", "--crop", "224", "--stride", "16",
                   "--set", "autocast=none", "--set", "cpus_per_task=1"]  # fmt: skip
ATTEMPT = re.compile(r"shard-(\d{6})\.zarr\.tmp-\d+-(\d+)-[0-9a-f]+$")  # ShardWriter's temporary store


def _report(capsys, what: str, figures: dict) -> None:
    with capsys.disabled():
        print(f"\nNODE-LOSS {what}: {json.dumps(figures, sort_keys=True)}", flush=True)


def _s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _shard_state(fs, cache: str) -> tuple[set[int], dict[int, set[int]]]:
    """(complete shards, {shard: pids of the attempts with a temporary store}) of the cache on S3, right now."""
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{cache}/shards", refresh=True)]
    except FileNotFoundError:
        return set(), {}
    done = {int(n[6:12]) for n in names if n.endswith(".done")}
    writing: dict[int, set[int]] = {}
    for n in names:
        if m := ATTEMPT.match(n):
            writing.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return done, writing


def _marker_pid(fs, cache: str, shard: int) -> int:
    """The worker process id that completed ``shard`` (from the attempt id in its completion marker)."""
    attempt = json.loads(fs.cat(f"{cache}/shards/shard-{shard:06d}.done"))["attempt"]
    return int(attempt.split("-")[1])


def _submit_and_kill(
    cluster: Cluster,
    submit: list[str],
    log: Path,
    kill: Callable[[subprocess.Popen, float], dict],
    wait_s: float,
) -> tuple[dict, int]:
    """Run ``spar submit`` (output to ``log``), let ``kill(proc, t0)`` take a node down mid-job and return its
    figures (plus ``job_wall_s``) and the submit's exit code once the job has ended."""
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            submit, cwd=ROOT, env=cluster.client_env(), stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        fig = kill(proc, t0)
        rc = proc.wait(timeout=wait_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    fig["job_wall_s"] = round(time.time() - t0, 1)
    return fig, rc


def test_precompute_survives_losing_a_worker_node(cluster: Cluster, tmp_path: Path, capsys):
    prefix = f"s3://{BUCKET}/precompute-node-loss"
    images = f"{prefix}/images"
    local = clean_env(**cluster.s3.env())  # one machine with S3 credentials, no cluster
    src = tmp_path / "src"
    write_synthetic_images(src, N_IMAGES, size=(320, 448), seed=1)
    t = time.monotonic()
    r = run_spar(["ingest", str(src), "--out", images, "--shard-size", str(SHARD_SIZE), "--no-augment",
                  "--quiet"], local, timeout=600)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ingest_s = time.monotonic() - t

    # the reference: the same image set, precomputed on this one machine (local Ray, cache on local disk)
    t = time.monotonic()
    r = run_spar(["precompute", "--images", images, "--cache-root", str(tmp_path / "ref"),
                  "--workdir", str(tmp_path / "ref-work"), *PRECOMPUTE_ARGS], local, timeout=900)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    reference_s = time.monotonic() - t
    ref_path = r.stdout.strip().splitlines()[-1]
    fingerprint = Path(ref_path).name
    cache = f"{prefix}/cache/{fingerprint}"  # the same spec gives the same fingerprint anywhere

    # the job on the cluster; one worker node dies while it has shards in flight
    log = tmp_path / "submit.log"
    # --workdir: record the run (MLflow goes to the tracking server named by the forwarded MLFLOW_TRACKING_URI)
    submit = [*SPAR, "submit", "--address", cluster.address, "--working-dir", str(ROOT), "precompute",
              "--images", images, "--cache-root", f"{prefix}/cache", "--workdir", "work", *PRECOMPUTE_ARGS]  # fmt: skip
    with cluster.s3.environ():
        fs = _s3()
        fig, rc = _submit_and_kill(
            cluster,
            submit,
            log,
            lambda proc, t0: _kill_a_node_mid_precompute(cluster, fs, cache, proc, t0),
            60,
        )
        fig["reference_single_machine_s"] = round(reference_s, 1)
        fig["ingest_s"] = round(ingest_s, 1)
        _report(capsys, "precompute (job)", {k: v for k, v in fig.items() if not k.endswith("pids")})
        output = log.read_text()
        assert rc == 0 and re.search(r"job \S+ SUCCEEDED", output), output[-5000:]
        assert cache in output.splitlines(), output[-2000:]  # the job printed the cache path

        # the tasks that died with the node were retried (Ray says so in the job's log) and the shards they had
        # started writing (their attempt's temporary store is left on S3) were completed by the surviving node
        retried = len(re.findall(r"Task compute_shard failed\. There are \d+ retries remaining", output))
        assert retried >= 1, output[-5000:]
        killed_pids, survivor_pids = set(fig.pop("killed_pids")), set(fig.pop("survivor_pids"))
        done, writing = _shard_state(fs, cache)
        assert done == set(range(N_IMAGES // SHARD_SIZE))
        finishers = {i: _marker_pid(fs, cache, i) for i in sorted(done)}
        assert set(finishers.values()) <= killed_pids | survivor_pids, finishers  # every writer was a node's
        recomputed = sorted(i for i, pids in writing.items() if pids & killed_pids)
        for i in recomputed:
            assert finishers[i] in survivor_pids, (i, finishers)
        fig["tasks_retried"] = retried
        fig["recomputed_shards"] = recomputed  # those the lost node had started writing
        fig["completed_by_lost_node_before_the_kill"] = sorted(
            i for i, p in finishers.items() if p in killed_pids
        )

        # nothing lost or wrong: the cache verifies, and equals the single-machine reference bit for bit
        r = run_spar(["cache", "verify", cache], local, timeout=600)
        assert r.returncode == 0 and "verified" in r.stdout, (r.stdout + r.stderr)[-3000:]
        _assert_same_cache(cache, ref_path, images)
        # the killed attempts' temporary stores are what `spar cache gc` removes; the cache still verifies
        r = run_spar(
            ["cache", "gc", "--cache-root", f"{prefix}/cache", "--older-than", "0"], local, timeout=300
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert _shard_state(fs, cache) == (done, {})
        r = run_spar(["cache", "verify", cache], local, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    # the job recorded what the cache cost on the tracking server: every shard computed, none failed
    import mlflow

    client = mlflow.MlflowClient(cluster.mlflow.url)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.cache_fingerprint = '{fingerprint}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    m = runs[0].data.metrics
    assert m["shards_computed"] == N_IMAGES // SHARD_SIZE and m["shards_failed"] == 0, m
    _report(capsys, "precompute", {k: v for k, v in fig.items() if not k.endswith("pids")})


def _kill_a_node_mid_precompute(
    cluster: Cluster, fs, cache: str, proc: subprocess.Popen, t0: float
) -> dict[str, object]:
    """Wait until a shard is complete and a worker node is writing another one, SIGKILL that node; then follow the
    job to its end (when the shards the node had in flight became complete, the other node's processes). Returns
    the figures (times in s after submission)."""
    deadline = time.monotonic() + 900
    victim = None
    first_write = None
    while victim is None:
        assert proc.poll() is None, "the job ended before a node could be killed"
        assert time.monotonic() < deadline, "no shard completed in time"
        done, writing = _shard_state(fs, cache)
        if first_write is None and writing:
            first_write = time.time()
        if done:
            for node in cluster.workers.values():
                pids = {p.pid for p in node.processes()}
                in_flight = sorted(i for i, ps in writing.items() if i not in done and ps & pids)
                if in_flight:
                    victim, victim_in_flight, done_at_kill = node, in_flight, sorted(done)
                    break
        time.sleep(0.2)
    running = sum("ray::compute_shard" in " ".join(p.cmdline()) for p in victim.processes() if p.is_running())
    killed = victim.kill()
    done_now = _shard_state(fs, cache)[0]  # a shard may have been completed between the listing and the kill
    victim_in_flight = [i for i in victim_in_flight if i not in done_now]
    fig: dict[str, object] = {
        "killed": victim.name,
        "killed_pids": killed["pids"],
        "killed_processes": len(killed["pids"]),
        "compute_shard_tasks_running_on_it": running,
        "first_shard_task_started_s": round((first_write or t0) - t0, 1),
        "killed_at_s": round(victim.killed_at - t0, 1),
        "complete_at_kill": done_at_kill,
        "in_flight_on_killed": victim_in_flight,
    }
    survivor_pids: set[int] = set()  # every process seen on the other node (the shards' writers among them)
    t_dead = t_recovered = t_complete = None
    while proc.poll() is None and time.monotonic() < deadline:
        for node in cluster.workers.values():
            if node is not victim:
                survivor_pids |= {p.pid for p in node.processes()}
        if t_dead is None and victim.name not in cluster.alive_nodes():
            t_dead = time.time()
        done_now = _shard_state(fs, cache)[0]
        if t_recovered is None and set(victim_in_flight) <= done_now:
            t_recovered = time.time()
        if t_complete is None and len(done_now) == N_IMAGES // SHARD_SIZE:
            t_complete = time.time()
        time.sleep(0.5)
    fig["survivor_pids"] = sorted(survivor_pids)
    fig["node_marked_dead_after_s"] = round(t_dead - victim.killed_at, 1) if t_dead else None
    fig["in_flight_shards_complete_after_s"] = (
        round(t_recovered - victim.killed_at, 1) if t_recovered else None
    )
    fig["cache_complete_after_s"] = round(t_complete - victim.killed_at, 1) if t_complete else None
    return fig


def _assert_same_cache(path: str, reference: str, images: str) -> None:
    """Complete, one entry per image, and every image's features equal the reference's exactly."""
    from pipeline.cache.reader import open_cache
    from pipeline.data.imageset import open_imageset

    c, ref = open_cache(path), open_cache(reference)
    assert c.fingerprint == ref.fingerprint and c.is_complete()
    keys = [k for i in range(c.num_shards) for k in c.shard_keys(i)]
    want = sorted(r.key for r in open_imageset(images).records)
    assert sorted(keys) == want and len(keys) == len(set(keys))
    for k in want:
        a, b = c.features(k, verify=True), ref.features(k, verify=True)
        assert a.dtype == b.dtype and a.shape == b.shape, k
        np.testing.assert_array_equal(a, b, err_msg=k)


# ------------------------------------------------------------------------------------------------------ distill

# as tests/reliability/test_train_faults.py: 2 DDP ranks (they fit on one worker node: WORKER_CPUS = 2), a
# checkpoint every 4 steps, up to 2 restarts; the tiny teacher over a small image set
DISTILL_STEPS, DISTILL_EVERY = 40, 4
DISTILL_SETS = [f"{k}={v}" for k, v in dict(
    workers=2, cpus_per_worker=1, max_steps=DISTILL_STEPS, checkpoint_every=DISTILL_EVERY, keep_checkpoints=3,
    lr=1e-3, seed=3, shuffle_buffer=4, log_every=1, loader_workers=0, max_failures=2, trainable_blocks=2,
    precision="fp32", register_model="").items()]  # fmt: skip
TINY_INGEST = ["--shard-size", "2", "--set", "target_long=192", "--set", "target_short=128",
               "--set", "min_short=64", "--quiet"]  # fmt: skip
TINY_PRECOMPUTE = ["--teacher", "tiny-clip-64", "--crop", "64", "--stride", "32", "--set", "autocast=none"]


def _distill_args(images: str, cache: str, workdir: str, storage: str, run: str) -> list[str]:
    args = ["distill", "--images", images, "--cache", cache, "--workdir", workdir,
            "--set", f"storage_path={storage}", "--set", f"run_name={run}"]  # fmt: skip
    for kv in DISTILL_SETS:
        args += ["--set", kv]
    return args


def _read_weights(ckpt: str) -> dict:
    from safetensors.torch import load

    from pipeline.common import storage

    return load(storage.read_bytes(f"{ckpt.rstrip('/')}/student.safetensors"))


def _position(ckpt: str) -> tuple[int, int, int]:
    from pipeline.common import storage

    s = json.loads(storage.read_bytes(f"{ckpt.rstrip('/')}/train_state.json"))
    return s["step"], s["epoch"], s["batch_in_epoch"]


def _registered_step(fs, run_dir: str) -> int:
    """Step of the newest checkpoint Ray Train's controller has registered in the run directory (0 when none)."""
    from pipeline.train.run_dir import RAY_SNAPSHOT_FILE
    from pipeline.train.state import step_of

    try:
        doc = json.loads(fs.cat(f"{run_dir}/{RAY_SNAPSHOT_FILE}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = (doc.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name", "")
    return step_of(latest) or 0


def _checkpoint_steps(fs, run_dir: str) -> list[int]:
    from pipeline.train.state import step_of

    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(run_dir, refresh=True)]
    except FileNotFoundError:
        return []
    return sorted(s for n in names if n.startswith("checkpoint_step") and (s := step_of(n)))


def test_distill_survives_losing_the_worker_node_of_its_training_group(
    cluster: Cluster, tmp_path: Path, capsys
):
    import torch

    from pipeline.train.state import checkpoint_dir_name

    prefix = f"s3://{BUCKET}/distill-node-loss"
    images = f"{prefix}/images"
    local = clean_env(**cluster.s3.env())  # one machine with S3 credentials, no cluster
    src = tmp_path / "src"
    write_synthetic_images(src, 8, size=(96, 128), seed=0)
    r = run_spar(["ingest", str(src), "--out", images, *TINY_INGEST], local, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = run_spar(["precompute", "--images", images, "--cache-root", f"{prefix}/cache",
                  "--workdir", str(tmp_path / "pre-work"), *TINY_PRECOMPUTE], local, timeout=900)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    cache = r.stdout.strip().splitlines()[-1]

    # the reference: the same run uninterrupted on this one machine (local Ray, everything on local disk)
    t = time.monotonic()
    ref_work = tmp_path / "ref-work"
    r = run_spar(_distill_args(images, cache, str(ref_work), str(ref_work / "ray_results"), "reference"), local,
                 timeout=900)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    reference_s = time.monotonic() - t
    ref_ckpt = str(ref_work / "ray_results" / "reference" / checkpoint_dir_name(DISTILL_STEPS))
    ref_student = re.search(r"^student checkpoint: (\S+)$", r.stdout, re.M).group(1)
    assert _position(ref_ckpt)[0] == DISTILL_STEPS

    # the job on the cluster: its training group's node dies once a checkpoint is registered
    run = "nodeloss"
    workdir = f"{prefix}/work"  # driver state and the exported student on S3 too, not only Ray Train storage
    storage_path = f"{prefix}/ray_results"
    run_dir = f"{storage_path}/{run}"
    log = tmp_path / "submit.log"
    submit = [*SPAR, "submit", "--address", cluster.address, "--working-dir", str(ROOT),
              *_distill_args(images, cache, workdir, storage_path, run)]  # fmt: skip
    with cluster.s3.environ():
        fs = _s3()
        fig, rc = _submit_and_kill(
            cluster,
            submit,
            log,
            lambda proc, t0: _kill_the_training_node(cluster, fs, run_dir, proc, t0),
            900,
        )
        fig["reference_single_machine_s"] = round(reference_s, 1)
        fig["checkpoints_after"] = _checkpoint_steps(fs, run_dir)
        _report(capsys, "distill (job)", fig)
        output = log.read_text()
        assert rc == 0 and re.search(r"job \S+ SUCCEEDED", output), output[-5000:]
        assert f"distill run {run}: {DISTILL_STEPS}/{DISTILL_STEPS} steps" in output, output[-3000:]

        # the group was restarted on the surviving node from the last checkpoint on S3, and finished the run with
        # the uninterrupted run's data position and weights (tolerance of tests/reliability/test_train_faults.py)
        final = f"{run_dir}/{checkpoint_dir_name(DISTILL_STEPS)}"
        assert _position(final) == _position(ref_ckpt)
        ref_w, got_w = _read_weights(ref_ckpt), _read_weights(final)
        assert ref_w.keys() == got_w.keys()
        for k in ref_w:
            torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=k)
        student = re.search(r"^student checkpoint: (\S+)$", output, re.M).group(1)
        assert student.startswith(f"{prefix}/work/"), student
        exported, ref_exported = _read_weights(student), _read_weights(ref_student)
        for k in ref_exported:
            torch.testing.assert_close(exported[k], ref_exported[k], rtol=1e-5, atol=1e-6, msg=k)
    _report(capsys, "distill", fig)


def _kill_the_training_node(
    cluster: Cluster, fs, run_dir: str, proc: subprocess.Popen, t0: float
) -> dict[str, object]:
    """Once Ray Train has registered a checkpoint, SIGKILL the worker node running the training group; then wait for
    the next checkpoint written after the restart. Returns the figures (times in s after submission)."""
    deadline = time.monotonic() + 600
    victim = None
    while victim is None:
        assert proc.poll() is None, (
            f"the job ended before a node could be killed ({_checkpoint_steps(fs, run_dir)})"
        )
        assert time.monotonic() < deadline, "no checkpoint registered in time"
        registered = _registered_step(fs, run_dir)
        if registered:
            for node in cluster.workers.values():
                ranks = [p for p in node.processes() if _is_train_worker(p)]
                if ranks:
                    victim, n_ranks = node, len(ranks)
                    break
        time.sleep(0.1)
    written = _checkpoint_steps(fs, run_dir)
    killed = victim.kill()
    fig: dict[str, object] = {
        "killed": victim.name,
        "killed_processes": len(killed["pids"]),
        "train_ranks_on_it": n_ranks,
        "killed_at_s": round(victim.killed_at - t0, 1),
        "registered_checkpoint_at_kill": registered,
        "checkpoints_on_s3_at_kill": written,
    }
    t_dead = t_next = None
    while t_dead is None or t_next is None:
        if time.monotonic() > deadline or proc.poll() is not None:
            break
        if t_dead is None and victim.name not in cluster.alive_nodes():
            t_dead = time.time()
        if t_next is None and any(s > max(written, default=0) for s in _checkpoint_steps(fs, run_dir)):
            t_next = time.time()
        time.sleep(0.5)
    fig["node_marked_dead_after_s"] = round(t_dead - victim.killed_at, 1) if t_dead else None
    fig["next_checkpoint_after_s"] = round(t_next - victim.killed_at, 1) if t_next else None
    return fig


def _is_train_worker(p) -> bool:
    try:
        return " ".join(p.cmdline()).startswith("ray::RayTrainWorker")
    except Exception:  # noqa: BLE001 - a process that just ended
        return False
