"""Real clusters for the executor tests, started by the tests themselves on 127.0.0.1 and stopped by their pids.

SlurmCluster: Debian's slurm-wlm and munge (`make slurm` installs them): munged with a key of its own, slurmctld and
one slurmd from a generated slurm.conf in a temp folder, on free ports, so a cluster of the machine (or of another
test run) is never touched. No accounting daemon: `sacct` answers "accounting storage is disabled", as on many small
clusters, and the executor must cope.
RayCluster: a head and a worker node started with `ray start`, as the README says, on a loopback host name where this
machine has one (Ray rewrites "localhost" and 127.0.0.1 to the network address); the driver joins by address.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find(program: str) -> str | None:
    """A daemon on PATH or in an sbin folder (a user's PATH often lacks /usr/sbin)."""
    return shutil.which(program) or next((str(Path(d) / program) for d in SBIN if (Path(d) / program).exists()), None)


def missing() -> list[str]:
    return [p for p in (*DAEMONS, "sbatch", "squeue", "scontrol", "scancel") if not find(p)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """\
ClusterName=lawbench-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
SlurmUser={user}
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=2
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=NO MaxTime=INFINITE State=UP
PartitionName=other Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """A one-node SLURM cluster (partitions `debug` and the default `other`) rooted in ``root``; ``env`` points the
    SLURM commands at it."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        for d in ("state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(CONF.format(root=self.root, ctld_port=_free_port(), slurmd_port=_free_port(),
                                         cpus=self.cpus, user=os.environ.get("USER") or "root"))
        run = self.root / "run"
        self._daemon("munged", "--force", f"--socket={run}/munge.socket", f"--key-file={key}",
                     f"--pid-file={run}/munged.pid", f"--log-file={self.root}/log/munged.log",
                     f"--seed-file={run}/munge.seed")
        self._daemon("slurmctld", "-f", str(self.conf))
        self._daemon("slurmd", "-f", str(self.conf), "-N", "localhost")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run("sinfo", "-h", "-o", "%t", "-p", "debug").stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM node never became idle: {self.logs()}")

    def _daemon(self, name: str, *args: str) -> None:
        res = subprocess.run([find(name), *args], capture_output=True, text=True, env={**os.environ, **self.env})
        if res.returncode != 0:
            self.stop()
            raise RuntimeError(f"{name} did not start: {(res.stderr or res.stdout).strip()[-500:]} {self.logs()}")

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([find(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=60)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as {key: value} (an array's first task for an array id)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout.splitlines()
        return dict(kv.split("=", 1) for kv in out[0].split() if "=" in kv) if out else {}

    def logs(self) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*.log")):
            tails.append(f"{log.name}: " + " | ".join(log.read_text(errors="replace").splitlines()[-5:]))
        return "; ".join(tails)

    def stop(self) -> None:
        """Every job cancelled (a job step, slurmstepd and its task, outlives a stopped slurmd), then the daemons
        stopped by their pids (slurmd, slurmctld, then munged), SIGKILL after 10 s."""
        if (self.root / "run" / "slurmctld.pid").exists():
            self.run("scancel", "--full", "-u", os.environ.get("USER") or "root")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i").stdout.strip():
                time.sleep(0.3)
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / "run" / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError, IndexError):
                continue
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (a child never reaped) is no daemon: read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def loopback_name() -> str | None:
    """A host name of this machine that resolves to a loopback address but is not spelt "localhost" or 127.0.0.1
    (Ray rewrites those two to the machine's network address: nodes, driver and traffic would leave 127.0.0.1)."""
    name = socket.gethostname()
    try:
        return name if socket.gethostbyname(name).startswith("127.") and name != "localhost" else None
    except OSError:
        return None


class RayCluster:
    """A Ray cluster of two nodes on this machine (a head and one worker, one CPU each), started as the README's recipe
    starts one: `ray start --head --port=PORT` and `ray start --address=HOST:PORT`, every node and the driver on
    ``host``: a loopback host name (``loopback_name``), or where this machine has none, Ray's own node address (the
    traffic still never leaves the machine). Each node runs in a session of its own (`--block`), so a node is stopped,
    or killed as a machine that fails, by its session's pids; the head's files live in a temp folder of the test run.
    The driver joins with ``flags``."""

    def __init__(self, host: str | None, tmp: Path):
        self.host, self.tmp = host, Path(tmp)

    def _ray(self) -> str:
        import sys
        return str(Path(sys.executable).with_name("ray"))

    def _node(self, *args: str) -> tuple[subprocess.Popen, int]:
        port = _free_port()
        on = [f"--node-ip-address={self.host}"] if self.host else []
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.tmp / f"ray-start-{port}.log", "w") as log:  # what a node that exits said
            proc = subprocess.Popen([self._ray(), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                                     f"--node-manager-port={port}", *on, *args], start_new_session=True,
                                    stdout=log, stderr=subprocess.STDOUT, env=_ray_env())
        return proc, port

    def start(self) -> "RayCluster":
        if self.host is None:
            import ray.util
            self.host = ray.util.get_node_ip_address()
        port = _free_port()
        self.address = f"{self.host}:{port}"
        self.head, self.head_port = self._node("--head", f"--port={port}", "--include-dashboard=false",
                                               f"--temp-dir={self.tmp}")
        self.worker = None
        try:
            self.wait_for_nodes(1)  # a node joining before the head answers exits at once
            self.worker, self.worker_port = self._node(f"--address={self.address}")
            self.wait_for_nodes(2)
        except BaseException:
            self.stop()  # no node outlives a cluster that did not come up
            raise
        self.flags = ["executor.name=ray", f"executor.address={self.address}",
                      f"executor.node_ip_address={self.host}"]
        return self

    def _alive(self) -> dict[int, str]:
        """{node manager port: node id} of the cluster's live nodes, as a driver joining by address sees them."""
        import json
        import sys
        code = ("import json, ray; ray.init(address=%r, _node_ip_address=%r, logging_level='ERROR'); "
                "print(json.dumps([[n['NodeManagerPort'], n['NodeID']] for n in ray.nodes() if n['Alive']]))"
                % (self.address, self.host))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_ray_env())
        if res.returncode != 0 or not res.stdout.strip():
            return {}
        return {int(port): nid for port, nid in json.loads(res.stdout.strip().splitlines()[-1])}

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in (self.head, self.worker):
                if proc is not None and proc.poll() is not None:
                    port = next(a.split("=")[1] for a in proc.args if a.startswith("--node-manager-port="))
                    said = (self.tmp / f"ray-start-{port}.log").read_text()[-1500:]
                    raise RuntimeError(f"ray start exited with {proc.returncode}: {' '.join(proc.args)}: {said}")
            self.nodes = self._alive()
            if len(self.nodes) == count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster at {self.address} has {len(self.nodes)} live nodes after {timeout} s, "
                           f"not {count}")

    def node_ids(self) -> tuple[str, str]:
        """(the head's node id, the worker's)."""
        return self.nodes[self.head_port], self.nodes[self.worker_port]

    def stop_worker(self) -> None:
        """The worker node's processes killed (SIGKILL), as a machine that fails."""
        _end_session(self.worker, signal.SIGKILL)

    def add_worker(self) -> None:
        self.worker, self.worker_port = self._node(f"--address={self.address}")
        self.wait_for_nodes(2)

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None:
                _end_session(proc, signal.SIGTERM)


def _ray_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


def _session(sid: int) -> list[int]:
    """Pids of the processes of session ``sid`` (a `ray start --block` and every process its node started: raylet,
    workers, agents; workers have process groups of their own, so a process group would miss them)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(d.name))
    return pids


def _end_session(proc: subprocess.Popen, sig: int, grace: float = 10) -> None:
    """``sig`` to every process of proc's session, then SIGKILL to what is left after ``grace`` seconds."""
    for s in (sig, signal.SIGKILL):
        for pid in _session(proc.pid):
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if s != signal.SIGKILL else 0)
        while time.monotonic() < deadline and _session(proc.pid):
            proc.poll()
            time.sleep(0.1)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
