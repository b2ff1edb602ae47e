"""The multi-node test cluster itself (tests/cluster/conftest.py): three Ray nodes with their own temp dirs and
resources, token auth on, and storage credentials reaching tasks only through the job's runtime environment."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.cluster.conftest import BUCKET, Cluster
from tests.e2e.conftest import http_status

pytestmark = [pytest.mark.slow, pytest.mark.ci]  # three Ray nodes and moto: ~35 s

# a job whose driver runs one task on each worker node (by its custom resource); each task reports where it ran,
# its node's temp dir, whether its process has S3 credentials, and writes one object to S3 with them
PROBE = r"""
import json, os, sys, ray
ray.init()

@ray.remote(num_cpus=0)
def probe(name, url):
    import s3fs
    ctx = ray.get_runtime_context()
    fs = s3fs.S3FileSystem()
    with fs.open(url, "w") as f:
        f.write(name)
    return {"name": name, "node": ctx.get_node_id(), "temp_dir": ctx.get_temp_dir(),
            "has_key": bool(os.environ.get("AWS_ACCESS_KEY_ID"))}

bucket = sys.argv[1]
out = ray.get([probe.options(resources={n: 0.01}).remote(n, f"s3://{bucket}/probe/{n}.txt")
               for n in ("node_a", "node_b")])
print("PROBE " + json.dumps(out))
"""


def test_three_nodes_own_temp_dirs_and_credentials_only_through_the_job(cluster: Cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    nodes = cluster.alive_nodes()
    assert set(nodes) == {"head", "node_a", "node_b"}, nodes
    assert nodes["head"]["resources_total"].get("CPU", 0) == 0  # the head only runs drivers
    for name in ("node_a", "node_b"):
        assert nodes[name]["resources_total"][name] == 1
    # one machine (Ray 2.60 maps --node-ip-address 127.0.0.1 to the routable address: docs/cluster.md §0)
    assert len({n["node_ip"] for n in nodes.values()}) == 1
    # each worker node keeps its session under its own temp dir, none under the head's
    for name, node in cluster.workers.items():
        assert list(node.tmp.glob("session_*/logs/raylet.out")), name
        assert {p.pid for p in node.processes()} >= {p.pid for p in node.processes_by_temp_dir()} - {
            node.proc.pid
        }
    # the node processes do not have storage credentials
    for name, node in cluster.workers.items():
        for p in node.processes():
            assert not any(k.startswith("AWS_") for k in p.environ()), (name, p.cmdline())
    # unauthenticated requests are refused
    assert http_status(f"{cluster.address}/api/jobs/")[0] == 401

    env = cluster.s3.env()
    client = JobSubmissionClient(cluster.address, headers=cluster.head.headers())
    script = cluster.root / "probe.py"
    script.write_text(PROBE)
    # without the job's env_vars the tasks have no credentials: the S3 write fails
    job = client.submit_job(entrypoint=f"python {script} {BUCKET}", runtime_env={"env_vars": {}})
    assert _wait(client, job) == JobStatus.FAILED
    assert re.search(r"credentials", client.get_job_logs(job), re.I), client.get_job_logs(job)[-3000:]
    # with them (as `spar submit` forwards them) both nodes write
    job = client.submit_job(entrypoint=f"python {script} {BUCKET}", runtime_env={"env_vars": env})
    assert _wait(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    logs = client.get_job_logs(job)
    out = json.loads(re.search(r"^PROBE (.*)$", logs, re.M).group(1))
    by_name = {o["name"]: o for o in out}
    assert by_name["node_a"]["node"] == nodes["node_a"]["node_id"]
    assert by_name["node_b"]["node"] == nodes["node_b"]["node_id"]
    for name, o in by_name.items():
        assert o["temp_dir"] == str(cluster.workers[name].tmp) and o["has_key"]
    with cluster.s3.environ():
        import s3fs

        fs = s3fs.S3FileSystem()
        assert fs.cat(f"{BUCKET}/probe/node_a.txt") == b"node_a"
        assert fs.cat(f"{BUCKET}/probe/node_b.txt") == b"node_b"


def _wait(client, job_id: str, timeout: float = 300):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if (
            status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
            or time.monotonic() > deadline
        ):
            return status
        time.sleep(0.2)
