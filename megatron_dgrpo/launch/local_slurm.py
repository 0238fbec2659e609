"""A real, throw-away single-node Slurm on this machine: munged, slurmctld and slurmd.

    with LocalSlurm(workdir) as slurm:            # raises SlurmUnavailable if it cannot start
        job = slurm.sbatch(["slurm/cpu_quickstart.sbatch"], cwd=repo)
        info = slurm.wait(job, timeout=300)        # {"JobState": "COMPLETED", ...}

Needs root (slurmd launches the jobs), the Debian packages slurmctld, slurmd, slurm-client and
munge, and no systemd: the daemons run in the foreground as children of this process, with a
minimal ``slurm.conf`` (one node on 127.0.0.1, proctrack/linuxproc, task/none, no accounting)
written into ``workdir``. Clients find it through ``SLURM_CONF`` (see :attr:`LocalSlurm.env`).
:meth:`stop` cancels every job, then stops every daemon this object started, and only those:
a munged that was already running is used as is and left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from megatron_dgrpo.parallel.launch import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "munge", "unmunge")
MUNGE_SOCKET_DIR = Path("/run/munge")
FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine; the message says why (tests skip on it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def check_prerequisites() -> None:
    """Raise :class:`SlurmUnavailable` unless a local Slurm can be started here."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local Slurm needs root (slurmd launches jobs as their user)")
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        raise SlurmUnavailable(
            f"missing {', '.join(missing)}: apt-get install -y --no-install-recommends "
            "slurmctld slurmd slurm-client munge")
    if not Path("/etc/munge/munge.key").is_file():
        raise SlurmUnavailable("no /etc/munge/munge.key (the munge package creates it; "
                               "or run `mungekey --create`)")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def slurm_conf(workdir: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int,
               partition: str) -> str:
    """The minimal slurm.conf of a one-node cluster whose state lives under ``workdir``."""
    return "\n".join([
        "ClusterName=dgrpo-local",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={workdir / 'state'}",
        f"SlurmdSpoolDir={workdir / 'spool'}",
        f"SlurmctldPidFile={workdir / 'slurmctld.pid'}",
        f"SlurmdPidFile={workdir / 'slurmd.pid'}",
        f"SlurmctldLogFile={workdir / 'slurmctld.log'}",
        f"SlurmdLogFile={workdir / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "JobRequeue=1",
        "MinJobAge=3600",       # keep finished jobs visible to scontrol (there is no sacct)
        "KillWait=30",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalSlurm:
    """One-node Slurm whose daemons are children of this process; see the module docstring."""

    def __init__(self, workdir: str | os.PathLike, cpus: int | None = None,
                 partition: str = "debug", start_timeout: float = 60.0):
        self.workdir = Path(workdir).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.start_timeout = start_timeout
        self.conf = self.workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> LocalSlurm:
        check_prerequisites()
        for sub in ("state", "spool"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.workdir, self.node, self.cpus, free_port(),
                                        free_port(), self.partition))
        try:
            self._start_munge()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        if _munge_works():
            return  # someone else's munged: use it, leave it alone
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        MUNGE_SOCKET_DIR.chmod(0o755)
        self._spawn("munged", [_which("munged"), "--foreground"], user="munge")
        deadline = time.monotonic() + 15
        while not _munge_works():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged started but `munge -n | unmunge` still fails")
            time.sleep(0.2)

    def _spawn(self, name: str, argv: list, user: str | None = None) -> None:
        log = open(self.workdir / f"{name}.stdout", "ab")
        process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, user=user, start_new_session=True)
        log.close()
        self._daemons.append((name, process))

    def _check_alive(self) -> None:
        for name, process in self._daemons:
            if process.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with code {process.returncode}:\n"
                                       + self.logs(name))

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = result.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node {self.node} not idle after {self.start_timeout:.0f} s "
                               f"(state {state!r}):\n" + self.logs("slurmctld") + self.logs("slurmd"))

    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons this object started (newest first)."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._daemons):
            self.run(["scancel", "--full", f"--partition={self.partition}"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(
                    ["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.5)
        for name, process in reversed(self._daemons):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self._daemons.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- clients
    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (``SLURM_CONF`` set)."""
        kwargs.setdefault("timeout", 60)
        result = subprocess.run(argv, env={**self.env, **kwargs.pop("env", {})},
                                capture_output=True, text=True, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result

    def sbatch(self, argv: list[str], **kwargs) -> int:
        """Submit with ``sbatch --parsable ARGV``; returns the job id."""
        out = self.run(["sbatch", "--parsable", *map(str, argv)], **kwargs).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout: float, until: tuple[str, ...] = FINISHED_STATES,
             poll: float = 1.0) -> dict[str, str]:
        """Poll until the job's state is one of ``until``; returns its fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f} s (waiting for {'/'.join(until)})")
            self._check_alive()
            time.sleep(poll)

    def logs(self, name: str, lines: int = 40) -> str:
        """The last lines of a daemon's log file and its captured stdout."""
        text = []
        for path in (self.workdir / f"{name}.log", self.workdir / f"{name}.stdout"):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                text.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(text) + "\n"
