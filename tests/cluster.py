"""A real multi-node Ray cluster on this machine, started with the ``ray`` CLI as an operator starts one.

Each node is its own ``ray start --block`` process (head: ``--head`` with the dashboard, which serves the Jobs
API; others: ``--address`` of the head's GCS), bound to 127.0.0.1 on free ports, with its own short
``--temp-dir`` and explicit ``--num-cpus`` and no GPUs. Each is started in a new session, so every process a
node starts (GCS, raylet, dashboard and its agents, workers, job drivers) is in that session and can be found
and ended by it; ``ray stop`` is never used, since it would stop every Ray on the machine.

Jobs go through ``ray job submit`` (the Jobs API over the dashboard's HTTP port); their state and logs are read
with the same CLI (``ray job status`` / ``ray job logs``) or the Jobs REST endpoint.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = Path(sys.executable).with_name("ray")
# Loopback, but not 127.0.0.1: Ray replaces 127.0.0.1 / localhost in --node-ip-address and --address with the
# machine's outward address (to make a node reachable from others); any other loopback address it keeps.
HOST = "127.0.0.2"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class ClusterError(AssertionError):
    pass


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    proc: subprocess.Popen  # `ray start --block`: the node lives as long as this process
    temp_dir: Path
    node_manager_port: int
    log: Path
    node_id: str = ""
    raylet_pid: int = 0
    sid: int = field(default=0)

    def raylet(self) -> psutil.Process | None:
        for p in _session_procs({self.sid}):
            try:
                if p.name() == "raylet" and p.status() != psutil.STATUS_ZOMBIE:
                    return p
            except psutil.Error:
                pass
        return None


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with _suppress():
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _session_procs(sids: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sids and p.pid != os.getpid():
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return out


class RayCluster:
    """Head + worker nodes on 127.0.0.1. Use as a context manager: ``stop()`` runs on exit whatever happened."""

    def __init__(self, env: dict | None = None):
        # Unix socket paths must stay short (107 bytes): a short root, not pytest's tmp_path
        self.root = Path(tempfile.mkdtemp(prefix="gsr", dir="/tmp"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Token authentication (Ray's default) with a token of this cluster's own, given to its processes and
        # to the CLI calls by the environment, so no ~/.ray/auth_token is read or written.
        self.token = secrets.token_hex(32)
        self.env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.nodes: list[Node] = []
        self.gcs_address = ""
        self.dashboard = ""

    # -- nodes -------------------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict | None, env: dict) -> Node:
        temp = self.root / name
        temp.mkdir()
        om, nm, agent_http, agent_grpc, rtenv, metrics = free_ports(6)
        cmd = [str(RAY), "start", "--block", "--node-ip-address", HOST, "--temp-dir", str(temp),
               "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--object-manager-port", str(om), "--node-manager-port", str(nm),
               "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(rtenv), "--metrics-export-port", str(metrics),
               "--min-worker-port", "0", "--max-worker-port", "0",  # workers: ports the OS picks
               "--object-store-memory", str(200 * 2**20), "--disable-usage-stats", "--log-style", "record",
               *(["--resources", json.dumps(resources)] if resources else []), *args]
        log = self.root / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **env}, start_new_session=True)
        node = Node(name, proc, temp, nm, log, sid=proc.pid)  # a new session's id is its leader's pid
        self.nodes.append(node)
        return node

    def _await_node(self, node: Node, timeout: float) -> Node:
        """Wait until the node's raylet is registered with the GCS; fill in its node id and raylet pid."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if node.proc.poll() is not None:
                raise ClusterError(f"ray start of {node.name} exited {node.proc.returncode}:\n{self.tail(node.log)}")
            raylet = node.raylet()
            if raylet is not None and self.dashboard:
                try:
                    m = re.search(r"--node_id=([0-9a-f]+)", " ".join(raylet.cmdline()))
                except psutil.Error:  # it died since: a failed start, seen by the next poll or the timeout
                    time.sleep(0.25)
                    continue
                alive = {n["node_id"]: n for n in self.list_nodes() if n["state"] == "ALIVE"}
                if m and m.group(1) in alive:
                    if alive[m.group(1)]["node_ip"] != HOST:
                        raise ClusterError(f"{node.name} is at {alive[m.group(1)]['node_ip']}, not {HOST}")
                    node.node_id, node.raylet_pid = m.group(1), raylet.pid
                    return node
            time.sleep(0.25)
        raise ClusterError(f"{node.name} did not join within {timeout:g} s:\n{self.tail(node.log)}")

    def start(self, head_cpus: int, workers: dict[str, int], timeout: float = 120, attempts: int = 2) -> list[Node]:
        """Start the head and the worker nodes ``{name: num_cpus}``; the workers are started as soon as the
        head's GCS accepts connections. Returns once every node is registered and the Jobs API answers. A start
        that fails (a raylet seen dying at start on a busy machine; a port taken between picking and binding)
        is stopped and tried again with fresh ports and directories, ``attempts`` times in all."""
        for attempt in range(attempts):
            try:
                return self._start_cluster(head_cpus, workers, timeout)
            except (ClusterError, psutil.Error) as e:
                if attempt + 1 == attempts:
                    raise
                print(f"cluster start failed ({type(e).__name__}: {str(e)[:300]}); starting again", flush=True)
                self.stop()
                self.root = Path(tempfile.mkdtemp(prefix="gsr", dir="/tmp"))
                self.nodes = []
        raise AssertionError("unreachable")

    def _start_cluster(self, head_cpus: int, workers: dict[str, int], timeout: float) -> list[Node]:
        gcs, dash, client = free_ports(3)
        self.gcs_address = f"{HOST}:{gcs}"
        self.dashboard = f"http://{HOST}:{dash}"
        head = self._start("head", ["--head", "--port", str(gcs), "--include-dashboard", "true",
                                    "--dashboard-host", HOST, "--dashboard-port", str(dash),
                                    "--ray-client-server-port", str(client)], head_cpus, None, {})
        t0 = time.monotonic()
        while not _accepts(HOST, gcs):
            if head.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise ClusterError(f"the head's GCS did not come up:\n{self.tail(head.log)}")
            time.sleep(0.1)
        nodes = [self.add_node(name, cpus, wait=False) for name, cpus in workers.items()]
        while not self._dashboard_up():  # the Jobs API answers once the dashboard is up
            if head.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise ClusterError(f"the head's dashboard did not come up:\n{self.tail(head.log)}")
            time.sleep(0.25)
        return [self._await_node(n, timeout - (time.monotonic() - t0)) for n in [head, *nodes]]

    def add_node(self, name: str, num_cpus: int, resources: dict | None = None, timeout: float = 90,
                 wait: bool = True) -> Node:
        """``ray start --address`` of the head's GCS. ``wait=False``: return at once; ``await_node`` later."""
        node = self._start(name, ["--address", self.gcs_address], num_cpus, resources, {})
        return self.await_node(node, timeout) if wait else node

    def await_node(self, node: Node, timeout: float = 90) -> Node:
        return self._await_node(node, timeout)

    def kill_raylet(self, node: Node) -> None:
        """SIGKILL the node's raylet, as a machine dying would end it."""
        os.kill(node.raylet_pid, signal.SIGKILL)

    def _dashboard_up(self) -> bool:
        try:
            return bool(self._get("/api/version"))
        except (OSError, ValueError):
            return False

    def list_nodes(self) -> list[dict]:
        """Every node the GCS knows (dead ones included), from the state API as ``ray list nodes`` shows it."""
        body = self._get("/api/v0/nodes?limit=100&detail=1")
        return body["data"]["result"]["result"]

    def list_state(self, kind: str, **filters: str) -> list[dict]:
        """The state API's ``actors`` / ``tasks`` (as ``ray list actors|tasks --filter k=v`` shows them)."""
        q = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        return self._get(f"/api/v0/{kind}?limit=10000&detail=1{q}")["data"]["result"]["result"]

    def _get(self, path: str) -> dict:
        req = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    # -- jobs --------------------------------------------------------------------------------------------
    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, "RAY_ADDRESS": self.dashboard}, stdin=subprocess.DEVNULL)

    def submit(self, entrypoint: list[str], submission_id: str) -> str:
        """``ray job submit --no-wait`` of ``entrypoint`` (absolute paths; it runs in the head's environment)."""
        r = self.ray_cli("job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                         "--no-wait", "--", *entrypoint)
        if r.returncode != 0:
            raise ClusterError(f"ray job submit failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return submission_id

    def job_info(self, job_id: str) -> dict:
        return self._get(f"/api/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float, poll=None) -> dict:
        """Wait for a terminal state; ``poll()`` is called between checks. Returns the job's info."""
        t0 = time.monotonic()
        while True:
            info = self.job_info(job_id)
            if info["status"] in TERMINAL:
                return info
            if time.monotonic() - t0 > timeout:
                self.ray_cli("job", "stop", "--address", self.dashboard, job_id, timeout=30)
                raise ClusterError(f"job {job_id} still {info['status']} after {timeout:g} s:\n"
                                   f"{self.job_logs(job_id)[-4000:]}")
            if poll is not None:
                poll()
            time.sleep(0.25)

    def job_logs(self, job_id: str) -> str:
        r = self.ray_cli("job", "logs", "--address", self.dashboard, job_id, timeout=60)
        return r.stdout + r.stderr

    # -- processes ---------------------------------------------------------------------------------------
    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the nodes' sessions, and anything naming its temp dir."""
        procs = {p.pid: p for p in _session_procs({n.sid for n in self.nodes})}
        root = str(self.root)
        for p in psutil.process_iter():
            try:
                if p.pid not in procs and p.pid != os.getpid() and root in " ".join(p.cmdline()):
                    procs[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return list(procs.values())

    def node_processes(self, node: Node) -> list[psutil.Process]:
        """The live (not zombie) processes of one node."""
        return _alive(_session_procs({node.sid}))

    def stop(self, grace: float = 3) -> list[str]:
        """End every process of the cluster: SIGTERM to each (Ray's processes exit on it; ``ray start --block``
        itself does not), SIGKILL to whatever is left after ``grace`` seconds; remove the temp dirs. Returns
        the processes that were still running when SIGKILL came, other than the ``ray start`` leaders."""
        leaders = {n.proc.pid for n in self.nodes}
        for p in self.processes():
            with _suppress():
                p.terminate()
        t0 = time.monotonic()
        while time.monotonic() - t0 < grace and [p for p in _alive(self.processes()) if p.pid not in leaders]:
            time.sleep(0.2)
        left = self.processes()
        stubborn = []
        for p in left:
            with _suppress():
                if p.pid not in leaders and p.status() != psutil.STATUS_ZOMBIE:
                    stubborn.append(f"{p.pid} {p.name()}")
                p.kill()
        psutil.wait_procs(left, timeout=10)
        for node in self.nodes:
            with _suppress():
                node.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
        return stubborn

    def tail(self, path: Path, n: int = 4000) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, typ, val, tb):
        return typ is not None and issubclass(typ, (OSError, psutil.Error, subprocess.TimeoutExpired))


