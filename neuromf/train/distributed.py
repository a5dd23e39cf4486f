"""Several processes, one model: PyTorch's own torch.distributed, set up from torchrun's or srun's environment.

    torchrun --nproc-per-node N -m neuromf train SPEC       RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    srun --ntasks-per-node N ... neuromf train SPEC         SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
                                                            master = first host of SLURM_STEP_NODELIST
    neuromf train SPEC                                      one process, no process group

One process per GPU (cuda:LOCAL_RANK, NCCL) or per CPU slot (gloo). Every
collective waits at most `hardware.collective_timeout_s`, so a rank that died
or hangs ends the others with an error instead of a silent wait.
`training.batch_size` is the GLOBAL batch: it must be divisible by
world_size * accumulate_grad_batches, and each rank trains on its block of it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = [
    "CollectiveError",
    "Dist",
    "Launch",
    "detect_launch",
    "first_host",
    "is_collective_error",
    "setup_distributed",
]


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs."""


# ---------------------------------------------------------------- who am I


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process (world_size 1: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun", "slurm" or "none"
    master_addr: str | None = None
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[07-09,12],cpu01" -> "gpu07"): `scontrol show hostnames` if
    available (not inside most containers), else the list's first name with each bracket at its first value."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    depth, first = 0, ""
    for ch in nodelist:  # the first entry: up to a comma outside brackets
        if ch == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(ch, 0)
        first += ch
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def _slurm_port(env: Mapping[str, str]) -> int:
    """A port every task of a job step computes alike: 12000-31999 (below Linux's ephemeral range)."""
    key = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}"
    return 12000 + int(hashlib.sha256(key.encode()).hexdigest(), 16) % 20000


def detect_launch(env: Mapping[str, str] = os.environ) -> Launch:
    """torchrun's variables first, then those of an srun job step with more than one task, else one process.

    Only a job STEP counts: the batch script of `sbatch --ntasks=2` also sees SLURM_NTASKS=2 and
    SLURM_PROCID=0, but it is one process (it is the one that calls srun).
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            "torchrun",
            env.get("MASTER_ADDR"),
            int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
        )
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and tasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        addr = env.get("MASTER_ADDR") or first_host(nodes)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _slurm_port(env)
        return Launch(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "slurm", addr, port)
    return Launch()


# ---------------------------------------------------------------- the process group


def is_collective_error(e: BaseException) -> bool:
    """A failed/timed-out collective (gloo raises plain RuntimeErrors, NCCL DistBackendError)."""
    if isinstance(e, (CollectiveError, dist.DistError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text
        for s in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Timed out waiting")
    )


@dataclass
class Dist:
    """This process's place in the run, and the few collectives the trainer needs (no-ops for one process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str = "none"
    timeout_s: int = 1800

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A failed or timed-out collective inside the block becomes a CollectiveError that names this rank."""
        try:
            yield
        except Exception as e:
            if not is_collective_error(e) or isinstance(e, CollectiveError):
                raise
            raise self.error(what, e) from e

    def error(self, what: str, e: BaseException) -> CollectiveError:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return CollectiveError(
            f"rank {self.rank} of {self.world_size}: {what} failed ({first}). Another rank has probably died or "
            f"hangs: look at its output. Collectives wait at most hardware.collective_timeout_s = {self.timeout_s} s."
        )

    def barrier(self, what: str = "a barrier") -> None:
        if self.enabled:
            with self.guard(what):
                dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", what: str = "an all-reduce") -> torch.Tensor:
        """In place on `tensor` (on this rank's device) and returned; op 'sum' or 'max'."""
        if self.enabled:
            with self.guard(what):
                dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def max_int(self, value: int, what: str = "an all-reduce") -> int:
        """The largest `value` over all ranks (one small collective)."""
        if not self.enabled:
            return value
        return int(self.all_reduce(torch.tensor([value], dtype=torch.int64, device=self.device), "max", what).item())

    def broadcast(self, obj: Any, what: str = "a broadcast") -> Any:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        with self.guard(what):
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    @contextmanager
    def main_first(self, what: str) -> Iterator[None]:
        """The body runs on rank 0, then (once it succeeded) on the others; rank 0's failure ends them too,
        instead of leaving them waiting (e.g. packing the shard: rank 0 packs, the others then only read)."""
        if not self.enabled:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException as e:
                self.broadcast(f"{type(e).__name__}: {e}".splitlines()[0], f"{what} (telling the others rank 0 failed)")
                raise
            self.broadcast(None, what)
            return
        failure = self.broadcast(None, f"{what} (waiting for rank 0)")
        if failure is not None:
            raise UserError(f"rank {self.rank}: {what} failed on rank 0 ({failure})")
        yield

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _device_for(spec: RunSpec, launch: Launch) -> torch.device:
    from neuromf.device import pick_device

    if pick_device(spec).type == "cpu":
        return torch.device("cpu")
    if launch.world_size == 1:
        return torch.device("cuda")  # the current device, as a single-GPU run always had it
    count = torch.cuda.device_count()
    # srun may show each task all GPUs of its node (use the LOCAL_RANK-th) or only its own (then there is one).
    if launch.local_rank < count:
        index = launch.local_rank
    elif count == 1:
        index = 0
    else:
        raise UserError(
            f"hardware.gpus_per_node: rank {launch.rank} is local process {launch.local_rank} on its node "
            f"but only {count} GPUs are visible there"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_world(spec: RunSpec, world_size: int, device: torch.device) -> None:
    """The global batch must split evenly; a GPU run should be the size the run-spec says (warned, not refused)."""
    t = spec.training
    if t.batch_size % (world_size * t.accumulate_grad_batches):
        raise UserError(
            f"training.batch_size: {t.batch_size} is the global batch of one optimizer step and must be divisible by "
            f"{world_size} process(es) x training.accumulate_grad_batches {t.accumulate_grad_batches}"
        )
    wanted = spec.hardware.nodes * spec.hardware.gpus_per_node
    if device.type == "cuda" and world_size != wanted:
        how = (
            "run it with torchrun or srun (container/train.sh does)"
            if world_size == 1
            else "the batch is still split evenly"
        )
        print(
            f"warning: hardware.nodes x hardware.gpus_per_node = {wanted} GPU(s), but {world_size} process(es) were "
            f"launched; {how}",
            file=sys.stderr,
            flush=True,
        )


def setup_distributed(spec: RunSpec, env: Mapping[str, str] = os.environ) -> Dist:
    """Detect the launcher, pick this rank's device, check the batch split, and join the process group."""
    launch = detect_launch(env)
    device = _device_for(spec, launch)
    check_world(spec, launch.world_size, device)
    info = Dist(
        launch.rank, launch.world_size, launch.local_rank, device, launch.launcher, spec.hardware.collective_timeout_s
    )
    if not info.enabled:
        return info
    if dist.is_initialized():  # set up by the caller (tests, a notebook): use that group
        if dist.get_world_size() != launch.world_size or dist.get_rank() != launch.rank:
            raise RuntimeError(
                f"a process group of {dist.get_world_size()} exists; the environment says {launch.world_size}"
            )
        return info
    # env:// reads MASTER_ADDR/PORT; under torchrun they point at the agent's store, which must be reused.
    if launch.master_addr is not None:
        os.environ["MASTER_ADDR"] = launch.master_addr
    if launch.master_port is not None:
        os.environ["MASTER_PORT"] = str(launch.master_port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise UserError(f"{launch.launcher}: MASTER_PORT is not set; set it to a free port shared by all ranks")
    backend = "nccl" if device.type == "cuda" else "gloo"
    with info.guard(f"joining the process group ({backend}, {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})"):
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=spec.hardware.collective_timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return info
