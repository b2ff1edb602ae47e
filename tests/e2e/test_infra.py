"""infra/ and jobs/: every manifest parses, everything it names exists in the project, the local scripts start
real servers bound to 127.0.0.1, and the MLflow server refuses unauthenticated requests in auth mode."""

from __future__ import annotations

import base64
import configparser
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import ROOT, http_status, listening_ips, mlflow_server

INFRA = ROOT / "infra"
RECIPES = sorted((ROOT / "jobs" / "configs").glob("*.toml"))
STAGE_JOBS = ("ingest", "precompute", "distill", "evaluate", "pipeline")


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _locked_version(name: str) -> str:
    m = re.search(rf'\[\[package\]\]\nname = "{name}"\nversion = "([^"]+)"', (ROOT / "uv.lock").read_text())
    assert m, name
    return m.group(1)


def _walk(obj):
    """Every (key, value) pair in a nested YAML structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _containers(doc: dict) -> list[dict]:
    return [c for k, v in _walk(doc) if k == "containers" for c in v]


# ------------------------------------------------------------------------------------------ parsing, references


def test_every_manifest_parses():
    yamls = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert {p.relative_to(ROOT).as_posix() for p in yamls} >= {
        "infra/ray/cluster.yaml",
        "infra/k8s/raycluster.yaml",
        "infra/k8s/rayjob.yaml",
        "infra/mlflow/docker-compose.yaml",
    }
    for p in yamls:
        assert _yaml_docs(p), p
    for p in RECIPES:
        tomllib.loads(p.read_text())
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in ini["mlflow"]  # no password in the template: it comes from a secret
    for script in [*INFRA.rglob("*.sh")]:
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


def test_jobs_entry_points_exist_and_forward_to_the_cli(monkeypatch, capsys):
    """`python -m jobs.<stage> --help` prints `spar <stage>`'s help and exits 0 (run as __main__, in-process)."""
    import runpy

    for name in STAGE_JOBS:
        assert (ROOT / "jobs" / f"{name}.py").is_file()
        monkeypatch.setattr("sys.argv", [f"jobs/{name}.py", "--help"])
        with pytest.raises(SystemExit) as exc:
            runpy.run_module(f"jobs.{name}", run_name="__main__", alter_sys=False)
        out = capsys.readouterr()
        if name == "pipeline" and "invalid choice: 'pipeline'" in out.err:
            continue  # `spar pipeline` is registered by pipeline.workflow.orchestrator, not in every build yet
        assert exc.value.code == 0, (name, out.err[-2000:])
        cmd = "eval" if name == "evaluate" else name
        assert f"usage: spar {cmd}" in out.out, (name, out.out[:500])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_load_into_every_stage_config(recipe):
    from pipeline.cache.config import PrecomputeConfig
    from pipeline.common.config import load_config
    from pipeline.data.config import IngestConfig
    from pipeline.eval.config import EvalConfig
    from pipeline.train.config import DistillConfig

    data = tomllib.loads(recipe.read_text())
    assert set(data) == {"run", "ingest", "precompute", "distill", "eval"}, recipe
    assert set(data["run"]) == {"workdir", "experiment"}
    for cls, section in (
        (IngestConfig, "ingest"),
        (PrecomputeConfig, "precompute"),
        (DistillConfig, "distill"),
        (EvalConfig, "eval"),
    ):
        load_config(cls, recipe, section=section)  # unknown keys / wrong types would raise ConfigError


def test_paper_recipes_match_the_paper():
    from pipeline.cache.config import PrecomputeConfig
    from pipeline.common.config import load_config
    from pipeline.train.config import DistillConfig

    mc = ROOT / "jobs/configs/maskclip_vitb16.toml"
    pre = load_config(PrecomputeConfig, mc, section="precompute")
    assert (pre.teacher, pre.pretrained, pre.crop, pre.stride) == (
        "maskclip-vit-b16",
        "laion2b_s34b_b88k",
        224,
        24,
    )
    d = load_config(DistillConfig, mc, section="distill")
    assert (d.lr, d.weight_decay, d.epochs, d.batch_size, d.trainable_blocks) == (2e-5, 1e-4, 10, 1, 2)
    sg = load_config(PrecomputeConfig, ROOT / "jobs/configs/siglip2_vitb16_512.toml", section="precompute")
    assert (sg.teacher, sg.crop, sg.stride) == ("siglip2-vit-b16-512", 512, 24)
    demo = load_config(PrecomputeConfig, ROOT / "jobs/configs/demo.toml", section="precompute")
    assert demo.teacher.startswith("tiny-") and demo.pretrained is None


def _check_entrypoint(cmd: str) -> None:
    """`python -m jobs.X ... --config jobs/configs/Y.toml ...`: module and recipe exist."""
    argv = shlex.split(cmd)
    i = argv.index("-m")
    module = argv[i + 1]
    assert module.startswith("jobs."), cmd
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
    if "--config" in argv:
        assert (ROOT / argv[argv.index("--config") + 1]).is_file(), cmd


def _check_cli_args(cmd: str) -> None:
    """The stage arguments of `python -m jobs.pipeline ...` are valid for the real `spar pipeline` parser and the
    recipe overrides they carry name real sections and keys."""
    from pipeline.cli import build_parser

    argv = shlex.split(cmd)
    stage = argv[argv.index("-m") + 1].split(".", 1)[1]
    args = build_parser(stage).parse_args([stage, *argv[argv.index("-m") + 2 :]])
    if stage == "pipeline":
        from pipeline.workflow.config import load_recipe

        flags = {k: v for k, v in {"workdir": args.workdir, "source": args.source}.items() if v}
        cfgs = load_recipe(str(ROOT / args.config), list(args.set or ()), run_flags=flags)
        assert cfgs.run.workdir.startswith("/mnt/spar/")
        assert cfgs.distill.storage_path.startswith("/mnt/spar/")


def test_every_named_path_module_and_recipe_exists():
    texts = {
        p: p.read_text()
        for p in [*INFRA.rglob("*"), ROOT / "docs" / "cluster.md"]
        if p.is_file() and p.suffix in (".yaml", ".yml", ".sh", ".md", ".ini", "") and p.exists()
    }
    assert texts
    for p, text in texts.items():
        for m in re.finditer(r"python -m (jobs\.\w+)", text):
            assert (ROOT / (m.group(1).replace(".", "/") + ".py")).is_file(), (p, m.group(0))
        for m in re.finditer(r"(?<![\w/])((?:jobs/configs|infra)/[\w./-]+\.(?:toml|yaml|sh|ini|sql))", text):
            assert (ROOT / m.group(1)).is_file(), (p, m.group(1))
        for m in re.finditer(r"-f (infra/[\w./-]*Dockerfile)", text):
            assert (ROOT / m.group(1)).is_file(), (p, m.group(1))


# ------------------------------------------------------------------------------------------------ containers


def test_project_image_definition():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "uv sync --frozen" in text
    for m in re.finditer(r"^COPY (?!--from)(.+?) \./?\S*$", text, re.M):
        for src in m.group(1).split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the project"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image must not run as root"
    ml = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow[auth]=={_locked_version('mlflow')}" in ml  # the server speaks the clients' version
    for m in re.finditer(r"^COPY (infra/\S+)", ml, re.M):
        assert (ROOT / m.group(1)).is_file()


def test_kuberay_manifests():
    cluster_docs = _yaml_docs(INFRA / "k8s" / "raycluster.yaml")
    kinds = {d["kind"]: d for d in cluster_docs}
    rc = kinds["RayCluster"]
    pvcs = {d["metadata"]["name"] for d in cluster_docs if d["kind"] == "PersistentVolumeClaim"}
    image = f"/spar:{_project_version()}"
    # every Ray container: the project image, token auth on with the token from a Secret
    containers = _containers(rc)
    assert len(containers) == 2
    for c in containers:
        assert c["image"].endswith(image), c["image"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "spar-ray-token"
        assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]  # credentials only from secrets
    # a GPU worker group
    gpu = [
        g
        for g in rc["spec"]["workerGroupSpecs"]
        if _containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu and gpu[0]["maxReplicas"] >= 1
    # shared storage mounted on head and workers, from a PVC defined here
    for group in [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]:
        vols = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        claim = vols["spar-shared"]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs
        mounts = {m["name"]: m["mountPath"] for m in _containers(group)[0]["volumeMounts"]}
        assert mounts["spar-shared"] == "/mnt/spar"
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"  # never a LoadBalancer / NodePort
    assert "NetworkPolicy" in kinds

    (job,) = _yaml_docs(INFRA / "k8s" / "rayjob.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    assert job["metadata"]["namespace"] == rc["metadata"]["namespace"]
    _check_entrypoint(job["spec"]["entrypoint"])
    assert "--config jobs/configs/maskclip_vitb16.toml" in job["spec"]["entrypoint"]
    _check_cli_args(job["spec"]["entrypoint"])
    assert "/mnt/spar/" in job["spec"]["entrypoint"]  # outputs on the shared volume
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"  # where infra/docker/Dockerfile puts the project
    assert "WORKDIR /app" in (INFRA / "docker" / "Dockerfile").read_text()
    (sub,) = _containers(job["spec"]["submitterPodTemplate"])
    assert sub["image"].endswith(image)
    env = {e["name"]: e for e in sub["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "valueFrom" in env["RAY_AUTH_TOKEN"]


def test_ray_cluster_launcher_config():
    cfg = _yaml_docs(INFRA / "ray" / "cluster.yaml")[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any("g" in t["node_config"]["InstanceType"].split(".")[0] for t in types.values())  # a GPU type
    setup = " ".join(cfg["setup_commands"])
    assert "uv sync --frozen" in setup
    assert cfg["file_mounts"]["~/spar"] == "."
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert ".venv" in cfg["rsync_exclude"]


def test_mlflow_deployment_requires_auth_and_binds_loopback():
    compose = _yaml_docs(INFRA / "mlflow" / "docker-compose.yaml")[0]
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # nothing published beyond loopback
        for key, value in (svc.get("environment") or {}).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), (name, key)
    ml = services["mlflow"]
    assert ml["build"]["dockerfile"] == "infra/mlflow/Dockerfile"
    assert (INFRA / "mlflow" / Path(ml["build"]["context"]) / ml["build"]["dockerfile"]).resolve().is_file()
    assert ml["image"].endswith(f"/spar-mlflow:{_locked_version('mlflow')}")
    assert ml["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    entry = (INFRA / "mlflow" / "entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entry and "postgresql://" in entry
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    assert "secrets/" in (INFRA / "mlflow" / ".gitignore").read_text()


def test_mlflow_in_kubernetes_is_internal_and_authenticated():
    docs = {d["kind"]: d for d in _yaml_docs(INFRA / "mlflow" / "k8s.yaml")}
    svc, dep = docs["Service"], docs["Deployment"]
    assert svc["spec"]["type"] == "ClusterIP" and "NetworkPolicy" in docs
    (c,) = _containers(dep)
    assert c["image"].endswith(
        f"/spar-mlflow:{_locked_version('mlflow')}"
    )  # the image whose entrypoint forces auth
    for e in c["env"]:
        if "PASSWORD" in e["name"] or "SECRET" in e["name"]:
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]
    # the RayCluster's tracking URI points at this Service
    rc = next(d for d in _yaml_docs(INFRA / "k8s" / "raycluster.yaml") if d["kind"] == "RayCluster")
    env = {e["name"]: e for e in _containers(rc)[0]["env"]}
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    port = svc["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{name}.{ns}.svc.cluster.local:{port}"


def test_local_scripts_refuse_non_loopback_hosts(tmp_path):
    r = subprocess.run(
        [str(INFRA / "local/start_ray_head.sh"), "--node-ip-address", "0.0.0.0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "127.0.0.1" in r.stderr
    r = subprocess.run(
        [str(INFRA / "local/start_mlflow_server.sh"), "--workdir", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "127.0.0.1" in r.stderr


# ----------------------------------------------------------------------------------------- real MLflow servers


def test_local_mlflow_server_logs_a_run_behind_basic_auth(tmp_path, monkeypatch):
    """One server from infra/local/start_mlflow_server.sh --auth (the plain mode starts in the cluster tests):
    loopback only; no or wrong credentials are refused; with credentials from the environment the MLflow client
    logs a run through it, whose params, metrics and artifact are read back from the sqlite store and the artifact
    folder after the server stopped; the admin password is not written to the workdir; MLflow's job runner (GenAI
    scorers: a huey runner and its consumer processes) is off, so the server is one process and its uvicorn."""
    import mlflow
    import psutil

    workdir = tmp_path / "wd"
    password = "s3cret-" + tmp_path.name
    with mlflow_server(workdir, auth=True, env_extra={"MLFLOW_AUTH_ADMIN_PASSWORD": password}) as server:
        assert listening_ips(server.port) == {"127.0.0.1"}
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert [" ".join(c.cmdline()[1:3]) for c in children] == ["-m uvicorn"], [
            c.cmdline() for c in children
        ]
        api = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
        status, _ = http_status(api, timeout=120)
        assert status == 401  # no credentials
        bad = base64.b64encode(b"admin:wrong").decode()
        assert http_status(api, {"Authorization": f"Basic {bad}"}, timeout=120)[0] == 401
        good = base64.b64encode(f"admin:{password}".encode()).decode()
        status, body = http_status(api, {"Authorization": f"Basic {good}"}, timeout=120)
        assert status == 200 and "experiments" in json.loads(body)
        # the MLflow client with credentials from the environment logs a run; without them it is refused
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = mlflow.MlflowClient(server.url)
        exp_id = client.create_experiment("spar-infra-test")
        run = client.create_run(exp_id, run_name="through-the-server")
        client.log_param(run.info.run_id, "backbone", "tiny-clip-64")
        client.log_metric(run.info.run_id, "loss", 0.25, step=3)
        client.log_text(run.info.run_id, "hello from the client", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        run_id = run.info.run_id
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(mlflow.exceptions.MlflowException, match="401|nauthori|ermission"):
            mlflow.MlflowClient(server.url).get_run(run_id)
    # independent reads after the server stopped: the sqlite store and the artifact directory on disk
    store = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    got = store.get_run(run_id)
    assert got.data.params == {"backbone": "tiny-clip-64"}
    assert got.data.metrics == {"loss": 0.25}
    assert got.info.status == "FINISHED"
    files = [p for p in (workdir / "mlartifacts").rglob("hello.txt")]
    assert len(files) == 1 and files[0].read_text() == "hello from the client"
    # the admin password is not written anywhere in the workdir when it comes from the environment
    assert not (workdir / "auth" / "admin_password").exists()
    assert not [p for p in workdir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
