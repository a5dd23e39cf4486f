"""DDP on CPU (gloo) with real processes: torchrun launches, the gradient sync around the JVP, cross-world resume.

The equivalence tested throughout: the global batch (training.batch_size = 4) split as 1 process x 2
micro-batches or as 2 processes x 1 micro-batch gives the same chunks with the same noise, so the same
gradients, weights, EMA and validation numbers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from slurm_fixture import slurm_cluster  # noqa: F401  (the fixture is used by name)
from test_trainer import tiny_raw

from neuromf.data.demo import build_demo_dataset
from neuromf.data.prepare import prepare_data
from neuromf.errors import UserError
from neuromf.model.unet import perturb_zero_init
from neuromf.spec import RunSpec, runspec_from_dict
from neuromf.train.checkpoint import load_checkpoint
from neuromf.train.distributed import CollectiveError, check_world, detect_launch, first_host
from neuromf.train.loop import Trainer, train

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
MAX_STEPS = 7  # 14 train latents / batch 4: 3 steps per epoch; epochs end at steps 3 and 6, then the final partial one

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 demo volumes at 16^3: 14 train / 2 val."""
    return build_demo_dataset(tmp_path_factory.mktemp("ddp_latents") / "demo", n_volumes=16, size=16, seed=0)


def ddp_raw(latent_dir: Path, run_dir: Path, processes: int, **training: Any) -> dict[str, Any]:
    """The tiny run-spec with the global batch 4 split as `processes` x (2 / processes) micro-batches."""
    raw = tiny_raw(
        latent_dir,
        run_dir,
        training={"max_steps": MAX_STEPS, "accumulate_grad_batches": 2 // processes, **training},
        sampling={"every_n_epochs": 1000, "n_samples": 2, "nfe": [1]},
        checkpoint={"save_every_n_epochs": 1, "latest_every_n_steps": 2, "keep_last": 5},
    )
    return raw


def write(raw: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def spec_of(raw: dict[str, Any]) -> RunSpec:
    return runspec_from_dict(raw, base_dir=Path(raw["paths"]["run_dir"]))


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 ARGS` (a free rendezvous port: other tests may run beside)."""
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def torchrun_train(spec: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = torchrun("-m", "neuromf", "train", str(spec), *extra)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def final(run_dir: Path) -> dict[str, Any]:
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{what}[{k}]: {m}")


def _plain_rank_envs(world: int = 2) -> list[dict[str, str]]:
    """The environment torchrun would give each rank, for processes started without it (a free port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        for r in range(world)
    ]


def log_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- launch environment (no processes)


def test_the_launcher_is_read_from_the_environment() -> None:
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29400"}
    got = detect_launch(torchrun_env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher, got.master_port) == (1, 4, 1, "torchrun", 29400)
    step = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
    }
    got = detect_launch(step)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (5, 8, 1, "slurm")
    assert got.master_addr in {"gpu07"} and 12000 <= got.master_port < 32000
    assert detect_launch(step).master_port == got.master_port  # every task computes the same port
    assert detect_launch({**step, "MASTER_PORT": "23456"}).master_port == 23456
    # The batch script of `sbatch --ntasks=2` sees SLURM_NTASKS=2 but is one process (it calls srun).
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}).world_size == 1
    assert detect_launch({}).world_size == 1


def test_first_host_of_a_slurm_node_list() -> None:
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = ""  # no scontrol: the built-in reading
    try:
        assert first_host("gpu[07-09,12],cpu01") == "gpu07"
        assert first_host("rack[1-2]-n[003,005]") == "rack1-n003"
        assert first_host("node12,node13") == "node12"
    finally:
        os.environ["PATH"] = env_path


def test_the_global_batch_must_split_evenly(latent_dir: Path, tmp_path: Path) -> None:
    spec = spec_of(ddp_raw(latent_dir, tmp_path / "run", 1))  # batch 4, accumulate 2
    check_world(spec, 2, torch.device("cpu"))  # 2 x 2 divides 4
    with pytest.raises(
        UserError, match=r"training.batch_size: 4 is the global batch .* 3 process\(es\) x .*accumulate_grad_batches 2"
    ):
        check_world(spec, 3, torch.device("cpu"))
    with pytest.raises(Exception, match="training.batch_size: 4 \\(the global batch\\) is not divisible by 4 GPU"):
        runspec_from_dict(
            {**ddp_raw(latent_dir, tmp_path / "run", 1), "hardware": {"device": "cpu", "gpus_per_node": 4}},
            base_dir=tmp_path,
        )


def test_the_data_order_resumes_with_another_number_of_processes(latent_dir: Path, tmp_path: Path) -> None:
    data = prepare_data(spec_of(ddp_raw(latent_dir, tmp_path / "run", 1)), "cpu", progress=False)
    ranks = [data.train_batches(2, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):  # into the second epoch (3 global batches per epoch)
        for r in ranks:
            r.next_batch()
    one = data.train_batches(4)
    one.load_state_dict(ranks[0].state_dict())
    for _ in range(3):
        assert torch.equal(one.next_batch(), torch.cat([r.next_batch() for r in ranks]))
    back = data.train_batches(2, rank=1, world_size=2)
    back.load_state_dict(one.state_dict())
    assert torch.equal(back.next_batch(), ranks[1].next_batch())
    with pytest.raises(UserError, match="training.batch_size was 4, now 6"):
        data.train_batches(3, rank=0, world_size=2).load_state_dict(one.state_dict())


# ---------------------------------------------------------------- a dead or hanging rank


HANG = """
import sys, time, torch
from pathlib import Path
from neuromf.spec import runspec_from_dict
from neuromf.train.distributed import setup_distributed
spec = runspec_from_dict({"hardware": {"device": "cpu", "collective_timeout_s": 10},
                          "training": {"batch_size": 2, "precision": "fp32"}}, base_dir=Path("."))
d = setup_distributed(spec)
if d.rank == 1:
    time.sleep(40 if sys.argv[1] == "hang" else 0)
    sys.exit(0)
t0 = time.time()
try:
    d.max_int(1, "the test's all-reduce")
except Exception as e:
    print(f"{type(e).__name__} after {time.time() - t0:.0f} s: {e}", flush=True)
"""


@pytest.mark.parametrize("how", ["dead", "hang"])
def test_a_dead_or_hanging_rank_is_a_clear_error_not_a_hang(how: str, tmp_path: Path) -> None:
    """Two plain processes (no torchrun, which would end rank 0 itself): rank 1 leaves, or sleeps past the timeout."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HANG, how], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for env in _plain_rank_envs()
    ]
    t0 = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.monotonic() - t0
    procs[1].kill()
    procs[1].wait()
    assert f"{CollectiveError.__name__} after" in out, out
    assert "rank 0 of 2: the test's all-reduce failed" in out and "hardware.collective_timeout_s = 10 s" in out, out
    if how == "hang":
        assert waited < 40, "rank 0 waited for the sleeping rank instead of timing out"


def test_rank_0_failing_to_pack_the_data_ends_every_rank(latent_dir: Path, tmp_path: Path) -> None:
    """Rank 0 packs the shard while the others wait; a bad latent ends them all (exit 2), nobody waits.

    Two plain `neuromf train` processes (torchrun would end rank 1 itself as soon as rank 0 fails).
    """
    import shutil

    bad_dir = tmp_path / "latents"
    shutil.copytree(latent_dir, bad_dir)
    broken = sorted(bad_dir.glob("*.pt"))[3]
    broken.write_bytes(b"not a tensor")
    spec = write(ddp_raw(bad_dir, tmp_path / "run", 2), tmp_path / "bad.yaml")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "neuromf", "train", str(spec)],
            env=env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for env in _plain_rank_envs()
    ]
    outs = [p.communicate(timeout=100)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert broken.name in outs[0] and "rank 1: preparing the data failed on rank 0 (UserError: " in outs[1], outs


# ---------------------------------------------------------------- one step: the gradient sync around the JVP


@needs_torchrun
@pytest.mark.slow
def test_one_step_of_two_processes_equals_one_process_and_a_bypass_diverges(latent_dir: Path, tmp_path: Path) -> None:
    """After one step both ranks hold identical gradients and weights, equal to one process's with accumulation.

    The control: the same step with the gradient passes on the bare module (what a JVP/gradient path that
    bypasses DDP amounts to) leaves each rank with its own gradients, and the ranks' weights diverge.
    """
    two = write(ddp_raw(latent_dir, tmp_path / "two", 2), tmp_path / "two.yaml")
    done = torchrun(str(REPO / "tests" / "_ddp_step.py"), str(two), str(tmp_path), "ddp", "bypass")
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = {
        v: [torch.load(tmp_path / f"{v}_rank{r}.pt", weights_only=False) for r in range(2)] for v in ("ddp", "bypass")
    }
    for results in ranks.values():
        assert all("error" not in r for r in results), results

    # One process, the same global batch as 2 micro-batches of 2, the same start.
    trainer = Trainer(spec_of(ddp_raw(latent_dir, tmp_path / "one", 1)))
    perturb_zero_init(trainer.net, generator=torch.Generator().manual_seed(0))
    applied, _ = trainer.train_step(trainer.batches.next_batch())
    assert applied
    one = {"grads": {n: p.grad for n, p in trainer.net.named_parameters()}, "params": trainer.net.state_dict()}
    trainer.log.close()

    rank0, rank1 = ranks["ddp"]
    assert rank0["applied"] and rank1["applied"]
    for key in ("grads", "params"):
        assert len(rank0[key]) == len(one[key])
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), f"ranks differ in {key}[{name}]"
        assert_close_states(rank0[key], one[key], f"2 processes vs 1: {key}")

    b0, b1 = ranks["bypass"]
    grad_gap = max((b0["grads"][n] - b1["grads"][n]).abs().max().item() for n in b0["grads"])
    param_gap = max((b0["params"][n] - b1["params"][n]).abs().max().item() for n in b0["params"])
    scale = max(g.abs().max().item() for g in one["grads"].values())
    assert grad_gap > 1e-3 * scale and param_gap > 1e-4, (grad_gap, param_gap)


# ---------------------------------------------------------------- whole runs across world sizes


@pytest.fixture(scope="module")
def straight_runs(latent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 7-step run as 1 process (accumulate 2, in this process) and as 2 processes (torchrun)."""
    base = tmp_path_factory.mktemp("ddp_runs")
    assert train(spec_of(ddp_raw(latent_dir, base / "one", 1))) == 0
    torchrun_train(write(ddp_raw(latent_dir, base / "two", 2), base / "two.yaml"))
    return {"one": base / "one", "two": base / "two", "base": base}


@needs_torchrun
@pytest.mark.slow
def test_two_processes_train_like_one(straight_runs: dict[str, Path]) -> None:
    one, two = final(straight_runs["one"]), final(straight_runs["two"])
    assert one["global_step"] == two["global_step"] == MAX_STEPS
    assert_close_states(one["model_state_dict"], two["model_state_dict"], "model")
    assert_close_states(one["ema_state_dict"], two["ema_state_dict"], "ema")
    # Validation sharded over 2 ranks and all-reduced = validation in one process.
    for a, b in zip(one["loss_history"]["val"], two["loss_history"]["val"]):
        assert a.keys() == b.keys() and a["val/mse_total"] == pytest.approx(b["val/mse_total"], rel=1e-5)
    # Only rank 0 logs: one record per step, one event per resume/sample set, not two.
    steps = [r["step"] for r in log_records(straight_runs["two"]) if "train/loss_total" in r]
    assert steps == list(range(1, MAX_STEPS + 1))
    assert sorted(p.name for p in (straight_runs["two"] / "checkpoints").glob("epoch_*.pt")) == [
        "epoch_0001.pt",
        "epoch_0002.pt",
        "epoch_0003.pt",
    ]


@needs_torchrun
@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(latent_dir: Path, straight_runs: dict[str, Path]) -> None:
    run_dir = straight_runs["base"] / "two_then_one"
    resume = straight_runs["two"] / "checkpoints" / "epoch_0001.pt"
    assert train(spec_of(ddp_raw(latent_dir, run_dir, 1)), resume=str(resume)) == 0
    assert any(r.get("event", "").startswith("resumed from") and r["step"] == 3 for r in log_records(run_dir))
    got, want = final(run_dir), final(straight_runs["one"])
    assert got["global_step"] == MAX_STEPS
    assert_close_states(got["model_state_dict"], want["model_state_dict"], "model")
    assert_close_states(got["ema_state_dict"], want["ema_state_dict"], "ema")


@needs_torchrun
@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_in_two_processes(latent_dir: Path, straight_runs: dict[str, Path]) -> None:
    run_dir = straight_runs["base"] / "one_then_two"
    spec = write(ddp_raw(latent_dir, run_dir, 2), straight_runs["base"] / "one_then_two.yaml")
    done = torchrun_train(spec, "--resume", str(straight_runs["one"] / "checkpoints" / "epoch_0001.pt"))
    assert "resumed from" in done.stderr and "at step 3" in done.stderr
    got, want = final(run_dir), final(straight_runs["one"])
    assert got["global_step"] == MAX_STEPS
    assert_close_states(got["model_state_dict"], want["model_state_dict"], "model")
    assert_close_states(got["ema_state_dict"], want["ema_state_dict"], "ema")


def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (children of its agent), read from /proc."""
    found: dict[int, int] = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0])] = int(child)
    return found


@needs_torchrun
@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(
    latent_dir: Path, straight_runs: dict[str, Path]
) -> None:
    """SIGUSR1 to rank 1 only: both ranks stop after the same step, rank 0 saves, both exit 75; the checkpoint
    then finishes in ONE process with the weights of the uninterrupted run."""
    run_dir = straight_runs["base"] / "signalled"
    spec = write(ddp_raw(latent_dir, run_dir, 2, max_steps=MAX_STEPS), straight_runs["base"] / "signalled.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "neuromf", "train", str(spec)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        log = run_dir / "training_log.jsonl"
        while not (log.exists() and any('"train/loss_total"' in line for line in log.read_text().splitlines())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        os.kill(_worker_pids(proc.pid)[1], signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Both workers exited 75 (torchrun itself then reports a failure, exit 1: resume with --resume auto).
    assert len(re.findall(r"exitcode\s+:\s*75\b", out)) == 2 and proc.returncode != 0, out[-3000:]
    assert "received SIGUSR1" in out, out[-3000:]
    saved = [r for r in log_records(run_dir) if r.get("event", "").startswith("SIGUSR1: saved")]
    assert len(saved) == 1, out[-3000:]
    stopped_at = saved[0]["step"]
    assert 1 <= stopped_at < MAX_STEPS and final(run_dir)["global_step"] == stopped_at

    assert train(spec_of(ddp_raw(latent_dir, run_dir, 1)), resume="auto") == 0
    got, want = final(run_dir), final(straight_runs["one"])
    assert got["global_step"] == MAX_STEPS
    assert_close_states(got["model_state_dict"], want["model_state_dict"], "model")


# ---------------------------------------------------------------- SLURM: the launcher and a real 2-task job


def test_the_launcher_asks_for_one_task_per_gpu(tmp_path: Path) -> None:
    """container/train.sh --dry-run on a 2 nodes x 3 GPUs run-spec: the sbatch options of a multi-GPU job."""
    sif = tmp_path / "trainer.sif"
    sif.write_text("placeholder\n")
    env = {
        **os.environ,
        "NEUROMF_RUNTIME": str(REPO / "container" / "host_runtime.sh"),
        "NEUROMF_SIF": str(sif),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        [
            str(REPO / "container" / "train.sh"),
            "--dry-run",
            "runspecs/demo.yaml",
            "--set",
            f"paths.run_dir={tmp_path / 'run'}",
            "--set",
            "hardware.nodes=2",
            "--set",
            "hardware.gpus_per_node=3",
            "--set",
            "training.batch_size=12",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("dry run, would submit:"))
    for option in ("--nodes=2", "--ntasks=6", "--ntasks-per-node=3", "--gres=gpu:3", "--signal=B:USR2@600"):
        assert f" {option} " in line, (option, line)
    assert "--ntasks=1 " not in line


def _slurm_job_env(cluster: Any, tmp_path: Path) -> dict[str, str]:
    from test_slurm import job_env

    return job_env(cluster, tmp_path, NEUROMF_TIME="15")  # minutes: the test sends the stop signal itself


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_task_slurm_job_stops_on_usr2_requeues_and_finishes(slurm_cluster: Any, tmp_path: Path) -> None:
    """The real launcher and worker on the one-node SLURM: srun -n 2 (gloo, host runtime), SIGUSR2 to the batch
    shell (as at the wall time) -> srun -> both ranks; rank 0 saves, both exit 75, the job requeues, resumes in
    2 tasks and completes, with the weights of one process trained on the same global batches."""
    from test_slurm import DEMO, SHORT_RUN, events, launch, sets

    max_steps = 10
    run = [
        *SHORT_RUN,
        "hardware.gpus_per_node=2",
        f"training.max_steps={max_steps}",
        "logging.log_every_n_steps=1",
        "checkpoint.latest_every_n_steps=1000",
        "sampling.n_samples=2",
        "sampling.nfe=[1]",
    ]
    slurm_dir = tmp_path / "slurm" / "run"
    submitted = launch(_slurm_job_env(slurm_cluster, tmp_path), str(DEMO), *sets(*run, f"paths.run_dir={slurm_dir}"))
    assert submitted.returncode == 0, submitted
    job_id = re.search(r"submitted job (\d+)", submitted.stdout).group(1)  # type: ignore[union-attr]
    assert "1 node(s) x 2 GPU(s)" in submitted.stdout

    finished = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"}
    deadline, signalled, info = time.monotonic() + 420, False, {}
    log = slurm_dir / "training_log.jsonl"
    while time.monotonic() < deadline:
        info = slurm_cluster.job(job_id)
        if info.get("JobState") in finished:
            break
        if not signalled and log.exists() and '"step": 3,' in log.read_text():
            stop = slurm_cluster.cmd("scancel", "--batch", "--signal=USR2", job_id)
            assert stop.returncode == 0, stop.stderr
            signalled = True
        time.sleep(1)
    log_dir = tmp_path / "slurm" / "phase_4" / "logs"
    out = (log_dir / f"neuromf_p4_train_{job_id}.out").read_text()
    err = (log_dir / f"neuromf_p4_train_{job_id}.err").read_text()
    story = f"job {info}\n--- .out\n{out}\n--- .err (tail)\n{err[-4000:]}\n{slurm_cluster.logs()}"
    assert signalled and info.get("JobState") == "COMPLETED", story
    assert int(info["Restarts"]) == 1, story

    assert "starting the trainer: srun --nodes=1 --ntasks=2 --ntasks-per-node=2 --kill-on-bad-exit=1" in out, story
    assert "(2 tasks, rank 0 on" in out and "2 processes (slurm, gloo)" in err, story
    assert "received SIGUSR2: forwarding to the trainer" in out, story
    assert err.count("received SIGUSR2: finishing the current step") == 2, story  # srun passed it to both ranks
    assert "trainer saved a checkpoint and exited 75 after SIGUSR2" in out and "trainer finished (exit 0)" in out, story
    done = events(slurm_dir)
    saved = [int(m.group(1)) for e in done if (m := re.match(r"SIGUSR2: saved \S+latest.pt at step (\d+)", e))]
    resumed = [int(m.group(1)) for e in done if (m := re.match(r"resumed from \S+ at step (\d+)", e))]
    assert len(saved) == 1 and resumed == saved and 3 <= saved[0] < max_steps, done
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "train/loss_total" in r]
    assert steps == list(range(1, max_steps + 1))  # rank 0 alone logs, and the resumed log continues seamlessly

    # One process, 2 micro-batches of 2: the same chunks, the same noise, the same weights.
    ref_dir = tmp_path / "reference" / "run"
    from neuromf.spec import load_runspec

    reference = load_runspec(
        DEMO, [*run, "hardware.gpus_per_node=1", "training.accumulate_grad_batches=2", f"paths.run_dir={ref_dir}"]
    )
    assert train(reference) == 0
    got, want = final(slurm_dir), final(ref_dir)
    assert got["global_step"] == want["global_step"] == max_steps
    assert_close_states(got["model_state_dict"], want["model_state_dict"], "model")
