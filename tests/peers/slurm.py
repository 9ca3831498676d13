"""A real Slurm cluster on loopback: munged, slurmctld and one slurmd per node, for the Slurm
scheduler adapter's tests.

:func:`start_slurm` writes a ``slurm.conf`` in a fresh temporary folder (a unique
``ClusterName``, free ports for slurmctld and for each node's slurmd, state, spool, pid and log
files all in that folder), starts its own ``munged`` on its own socket with a new key, then
``slurmctld -D`` and ``slurmd -D -N NAME`` per node as children in process groups of their
own, each under coreutils ``timeout`` so a run killed midway leaves nothing behind for long. It
waits (bounded) until ``sinfo`` shows every node idle. :meth:`SlurmCluster.stop` cancels the
jobs, kills every process group and removes the folder. Two clusters can run at once (two
pytest-xdist workers): nothing is shared but the binaries.

Needs root (slurmd runs jobs as their user) and Debian's ``slurm-wlm`` and ``munge`` packages
(``scripts/bootstrap --dev`` installs them). Seen with Slurm 22.05: a ``SLURM_CONF`` that does
not exist makes every client retry for 60 s; a controller that does not answer costs a client
about ``MessageTimeout`` (10 s) before ``Unable to contact slurm controller (connect
failure)``; a job starts 1-4 s after ``sbatch``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import LOOPBACK, bounded_command, free_tcp_port, log_tail, stop_process_group

NODES = ("gpu-lab-01", "gpu-lab-02", "gpu-lab-03", "gpu-lab-04")
TOOLS = ("munged", "slurmctld", "slurmd", "scontrol", "squeue", "sinfo", "sbatch", "scancel")


class SlurmUnavailable(Exception):
    """Slurm cannot run here (not root, binaries missing); the message says why."""


@dataclass
class SlurmCluster:
    """A running cluster; ``env`` points Slurm's client tools at it."""

    root: Path
    cluster: str
    hostname: str
    nodes: tuple[str, ...]
    controller_port: int
    node_ports: dict[str, int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(
        self, *args: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client tool (``scontrol``, ``squeue``, ``sinfo`` ...) on this cluster."""
        done = subprocess.run(
            list(args),
            env={**os.environ, **self.env, "SLURM_TIME_FORMAT": "standard"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done

    def submit(self, node: str, seconds: int) -> str:
        """Queue ``sleep SECONDS`` on ``node`` (one CPU); returns the job id."""
        where = (f"--nodelist={node}", f"--chdir={self.root}", f"--output={self.root}/job-%j.out")
        done = self.run("sbatch", "--parsable", "--ntasks=1", *where, f"--wrap=sleep {seconds}")
        return done.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> str:
        """``RUNNING``, ``PENDING`` ...; ``""`` once the job has left the queue."""
        done = self.run("squeue", "--noheader", f"--jobs={job}", "--format=%T", check=False)
        return done.stdout.strip()

    def wait_job(self, job: str, states: Sequence[str], timeout: float = 30) -> str:
        """Poll until the job is in one of ``states`` (``""``: gone); returns that state."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} is {state or 'gone'}, not {'/'.join(states)}")
            time.sleep(0.2)
        return state

    def cancel(self, job: str) -> None:
        self.run("scancel", job)

    def conf_with(self, **settings: str | int) -> Path:
        """A copy of ``slurm.conf`` with these settings replaced or added (a controller port
        where nothing answers, a shorter MessageTimeout)."""
        lines = [
            line
            for line in self.conf.read_text().splitlines()
            if line.split("=", 1)[0] not in settings
        ]
        lines += [f"{key}={value}" for key, value in settings.items()]
        path = self.root / f"variant-{secrets.token_hex(4)}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{log_tail(path)}" for path in sorted(self.root.glob("log/*"))
        )

    def stop(self) -> None:
        """Cancel the jobs, kill slurmd, slurmctld and munged, remove the folder."""
        try:
            if self.processes and self.processes[-1].poll() is None:
                with contextlib.suppress(Exception):
                    self.run("scancel", "--user=root", timeout=10, check=False)
                    deadline = time.monotonic() + 10
                    while (
                        time.monotonic() < deadline
                        and self.run("squeue", "--noheader", timeout=10, check=False).stdout.strip()
                    ):
                        time.sleep(0.2)
            for process in reversed(self.processes):
                stop_process_group(process)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_slurm(
    nodes: Sequence[str] = NODES, ready_timeout: float = 60, lifetime: float = 3600
) -> SlurmCluster:
    """Start a cluster of ``nodes`` (root only); raises :class:`SlurmUnavailable` when it
    cannot run here, ``RuntimeError`` when it did not come up."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmd runs jobs as their user: starting it needs root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SlurmUnavailable(
            f"Slurm is not installed (no {', '.join(missing)}):"
            " scripts/bootstrap --dev installs slurm-wlm and munge"
        )
    failure: RuntimeError | None = None
    for _attempt in range(3):  # a free port can be taken before a daemon binds it
        cluster = _launch(tuple(nodes), lifetime)
        try:
            _wait_ready(cluster, ready_timeout)
        except RuntimeError as exc:
            died = any(process.poll() is not None for process in cluster.processes)
            cluster.stop()
            if not died:  # up but not ready: other ports would not help
                raise
            failure = exc
            continue
        return cluster
    assert failure is not None
    raise failure


def _launch(nodes: tuple[str, ...], lifetime: float) -> SlurmCluster:
    root = Path(tempfile.mkdtemp(prefix="provisioner-slurm-"))
    cluster = SlurmCluster(
        root=root,
        cluster=f"t{secrets.token_hex(5)}",
        hostname=socket.gethostname().split(".")[0],
        nodes=nodes,
        controller_port=free_tcp_port(),
        node_ports={node: free_tcp_port() for node in nodes},
    )
    for sub in ("munge", "state", "log", *(f"spool/{node}" for node in nodes)):
        (root / sub).mkdir(parents=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    cluster.conf.write_text(_conf(cluster))
    munge = root / "munge"
    try:
        files = (f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/seed", f"--key-file={key}")
        argv = ["munged", "--foreground", "--force", f"--socket={munge}/socket", *files]
        _spawn(cluster, "munged", lifetime, [*argv, f"--log-file={root}/log/munged.log"])
        _wait(cluster, lambda: (munge / "socket").exists(), 10, "munged's socket")
        _spawn(cluster, "slurmctld", lifetime, ["slurmctld", "-D", "-f", str(cluster.conf)])
        for node in nodes:
            argv = ["slurmd", "-D", "-N", node, "-f", str(cluster.conf)]
            _spawn(cluster, f"slurmd-{node}", lifetime, argv)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _spawn(cluster: SlurmCluster, name: str, lifetime: float, argv: list[str]) -> None:
    with (cluster.root / "log" / f"{name}.out").open("wb") as out:
        cluster.processes.append(
            subprocess.Popen(
                bounded_command(argv, lifetime),
                env={**os.environ, **cluster.env},
                cwd=cluster.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )


def _conf(cluster: SlurmCluster) -> str:
    root = cluster.root
    node_lines = "".join(
        f"NodeName={node} NodeHostname={cluster.hostname} NodeAddr={LOOPBACK} CPUs=2"
        f" RealMemory=1000 Port={port} State=UNKNOWN\n"
        for node, port in cluster.node_ports.items()
    )
    return f"""\
ClusterName={cluster.cluster}
SlurmctldHost={cluster.hostname}({LOOPBACK})
SlurmctldPort={cluster.controller_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
{node_lines}PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _wait_ready(cluster: SlurmCluster, timeout: float) -> None:
    want = dict.fromkeys(cluster.nodes, "idle")

    def ready() -> bool:
        done = cluster.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
        seen = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
        return seen == want

    _wait(cluster, ready, timeout, "every node idle in sinfo")


def _wait(cluster: SlurmCluster, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p.args for p in cluster.processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"exited: {dead}" if dead else f"not after {timeout:.0f} s"
            raise RuntimeError(f"Slurm not ready ({what}; {why}):\n{cluster.logs()}")
        time.sleep(0.2)
