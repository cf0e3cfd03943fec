"""`medssl ingest --engine ray` on a two-node Ray cluster: two `ray start` nodes on this machine, each with
its own temp folder and one CPU, joined through the head's port on 127.0.0.1, reading the archive from and
writing the dataset to a real S3 server (moto) on 127.0.0.1.

Teardown ends exactly the processes this test started (each node's `ray start --block` leads its own
process group) and never calls `ray stop`, which would end every Ray instance on the machine, other
users' and other tests' included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

RAY = Path(sys.executable).with_name("ray")
FILES, FILES_PER_UNIT = 12, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_processes(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the cluster's temp folder: unique to this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return found


class TwoNodeRay:
    """A head and a second node started with `ray start --block`; ``address`` is 127.0.0.1:PORT."""

    def __init__(self, env: dict):
        # Ray's socket paths must stay under ~107 bytes: a short folder, not pytest's tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.env, self.nodes = env, []
        self.address = f"127.0.0.1:{_free_port()}"

    def start(self) -> None:
        self._node("head", "--head", "--port", self.address.split(":")[1], "--include-dashboard", "false",
                   "--ray-client-server-port", str(_free_port()))
        self._node("second", "--address", self.address)

    def _node(self, name: str, *args: str) -> None:
        log = self.root / f"{name}.log"
        cmd = [str(RAY), "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
               "--object-store-memory", str(100 * 2**20), "--temp-dir", str(self.root / name),
               "--dashboard-agent-listen-port", str(_free_port()), *args]
        with open(log, "w") as out:
            self.nodes.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert self.nodes[-1].poll() is None and time.monotonic() < deadline, \
                f"ray start of the {name} node failed:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

    def tasks_per_node(self, task: str) -> dict[str, int]:
        """Tasks named ``task`` each node ran, from the ``:task_name:`` lines Ray writes into its workers'
        log files when a task starts (the files of a node are under its own temp folder)."""
        return {node: sum(f.read_text(errors="replace").splitlines().count(f":task_name:{task}")
                          for f in (self.root / node).glob("session_*/logs/worker-*.out"))
                for node in ("head", "second")}

    def stop(self) -> None:
        for node in self.nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)  # SIGTERM would drain for 30 s first
            except ProcessLookupError:
                pass
            node.wait()
        for pid in _own_processes(str(self.root)):  # anything that left the node's process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    pytest.importorskip("ray")
    # Token authentication (Ray's default for `ray start`) with a token of this test, not the user's
    # ~/.ray/auth_token: every node and the driver get it through the environment.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cluster = TwoNodeRay(env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert not _own_processes(str(cluster.root)), "Ray processes of the test cluster outlived its teardown"


def _write_pngs(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(FILES):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_ingest_on_a_two_node_ray_cluster_from_and_into_object_storage(tmp_path, s3_bucket, ray_cluster):
    # s3_bucket comes first: its AWS variables are in the environment both nodes start with, and work
    # units run in Ray workers, which take their node's environment, not the driver's.
    import s3fs

    from medssl import storage

    _write_pngs(tmp_path / "archive")
    s3fs.S3FileSystem().put(str(tmp_path / "archive"), f"{s3_bucket}/archive", recursive=True)
    out = f"{s3_bucket}/dataset"
    proc = subprocess.run(
        [sys.executable, "-m", "medssl.cli", "ingest", f"{s3_bucket}/archive", "--out", out, "--quiet",
         "--engine", "ray", "--ray-address", ray_cluster.address, "--set", f"files_per_chunk={FILES_PER_UNIT}"],
        capture_output=True, text=True, env=ray_cluster.env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert report["files"] == FILES and report["status"] == {"ingested": FILES}
    assert report["this_run"]["bytes_read"] == sum(p.stat().st_size for p in (tmp_path / "archive").iterdir())
    assert sorted(storage.listdir(f"{out}/manifest")) == [f"chunk-{c:06d}.jsonl"
                                                          for c in range(FILES // FILES_PER_UNIT)]
    ran = ray_cluster.tasks_per_node("_call")
    assert all(ran.values()), f"work units per node: {ran}; both nodes should have run some"
