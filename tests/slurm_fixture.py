"""A real single-node SLURM on this machine, for tests: Debian's slurm-wlm + munge, started and stopped by a fixture.

`slurm_cluster` (session scope) installs the packages with apt-get when they are missing (root only), writes a
slurm.conf for one node (NodeName=localhost NodeAddr=127.0.0.1, no cgroups, free ports, state in a temporary
folder), starts munged (as the munge user, unless one already answers), slurmctld and `slurmd -N localhost`, waits
for the node to be idle, and stops every daemon it started at the end. Where SLURM cannot be had, the tests that use
it are skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurm-wlm", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "munge"]


def _run(cmd: list[str], timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def install_problem() -> str | None:
    """None when SLURM and munge are installed (installing them with apt-get if needed), else why they are not."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            done = _run(cmd, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-500:]}"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    return f"installed {PACKAGES} but {missing} are still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_hardware() -> str:
    """CPUs/sockets/cores/threads/memory of this machine as `slurmd -C` sees them (so the node is not drained)."""
    out = _run(["slurmd", "-C"]).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    if "RealMemory" in fields:  # leave room so the node never reports less than configured
        fields["RealMemory"] = str(int(int(fields["RealMemory"]) * 0.9))
    return " ".join(f"{k}={fields[k]}" for k in keep if k in fields) or f"CPUs={os.cpu_count()}"


def slurm_conf(workdir: Path) -> str:
    """slurm.conf for a one-node cluster on 127.0.0.1; requeued jobs restart within seconds (sched_interval=2)."""
    return f"""\
ClusterName=neuromftest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running one-node cluster. `env` carries SLURM_CONF for every client command (and the jobs)."""

    workdir: Path
    conf: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def cmd(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run(list(args), timeout=timeout, env=self.env)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the controller has forgotten the job)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def jobs(self) -> list[str]:
        """Ids of every job the controller knows, finished ones included (kept MinJobAge seconds)."""
        out = self.cmd("scontrol", "show", "job", "-o").stdout
        return re.findall(r"^JobId=(\d+)", out, flags=re.M)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job reaches one of `states` (e.g. {"COMPLETED", "FAILED"}); the last info on timeout."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        return info

    def logs(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)


def _munge_works(env: dict[str, str]) -> bool:
    try:
        cred = _run(["munge", "-n"], timeout=10, env=env)
        return cred.returncode == 0 and _run(["unmunge"], timeout=10, env=env, input=cred.stdout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munged(workdir: Path, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Start munged as the munge user (None if one already answers). Raises RuntimeError if it cannot."""
    if _munge_works(env):
        return None
    user = pwd.getpwnam("munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():  # the package's postinst normally creates it
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        os.chown(key, user.pw_uid, user.pw_gid)
        key.chmod(0o400)
    for folder in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, user.pw_uid, user.pw_gid)
    log = open(workdir / "munged.out", "wb")
    proc = subprocess.Popen(["munged", "-F"], user=user.pw_uid, group=user.pw_gid, stdout=log, stderr=log, env=env)
    for _ in range(50):
        if _munge_works(env):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"munged did not start: {(workdir / 'munged.out').read_text(errors='replace')[-500:]}")


def _stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_cluster(workdir: Path) -> SlurmCluster:
    """Write the configuration and start munged, slurmctld and slurmd; returns once the node is idle."""
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    conf = workdir / "slurm.conf"
    conf.write_text(slurm_conf(workdir))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(workdir=workdir, conf=conf, env=env)
    try:
        munged = _start_munged(workdir, env)
        if munged is not None:
            cluster.procs["munged"] = munged
        for name, cmd in (
            ("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)]),
            ("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(conf)]),
        ):
            log = open(workdir / f"{name}.out", "wb")
            cluster.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
            time.sleep(1)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{cluster.logs()}")
            state = cluster.cmd("sinfo", "-h", "-N", "-o", "%t").stdout.strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"the node did not become idle (state {state!r})\n{cluster.logs()}")
    except BaseException:
        stop_cluster(cluster)
        raise


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel what is left, then stop the daemons this fixture started (slurmd, slurmctld, munged)."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        try:
            cluster.cmd("scancel", "--full", "--user=root", timeout=10)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and cluster.cmd("squeue", "-h", timeout=10).stdout.strip():
                time.sleep(1)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for name in ("slurmd", "slurmctld", "munged"):
        if name in cluster.procs:
            _stop(cluster.procs[name])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running single-node SLURM (skips the test where SLURM cannot be installed)."""
    problem = install_problem()
    if problem is not None:
        pytest.skip(problem)
    workdir = tmp_path_factory.mktemp("slurm")
    # Installed but not starting is a failure, not a skip: the configuration or this machine broke.
    cluster = start_cluster(workdir)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
