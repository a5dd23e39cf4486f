"""`neuromf train`: the whole training loop, top to bottom.

    spec -> device, seeds -> data -> network, loss, EMA, optimizer, schedule
         -> resume (checkpoint) -> run(): loop over optimizer steps:
              batch -> train_step (micro-batches: noise, loss, backward -> clip -> NaN/Inf guard
                                   -> AdamW -> LR -> EMA -> counters)
              -> log | epoch end: validation, periodic checkpoint, samples | stop signal: save, exit 75
         -> final validation, samples, checkpoint

One step from `neuromf train` to `optimizer.step`: neuromf/cli/train.py -> train() -> Trainer.run
-> Trainer.train_step (this file), with the loss maths in neuromf/meanflow/loss.py.

Randomness: the noise and times (e, t, r) of micro-batch chunk c of optimizer
step s come from a generator seeded by (training.seed, s, c), and the data
order is a function of (seed, epoch, position). So a run that is killed and
resumed ends with the same weights as one that was not, without any generator
state.

Several processes (torchrun or srun; neuromf/train/distributed.py): the global
batch (training.batch_size) is split into world_size blocks, rank r trains on
block r, cut into accumulate_grad_batches micro-batches; chunk
c = r * accumulate + micro. One process with accumulate 2 and two with
accumulate 1 thus see the same chunks with the same noise, and their gradients
agree. The gradient passes run through DDP (gradients all-reduced after the
last micro-batch, no_sync before), the no-grad JVP on the bare module (a JVP
through the DDP wrapper could bypass its gradient sync: docs/design.md, 'The JVP on the bare module, the gradient passes through DDP'). Every rank
keeps the EMA (the weights are identical everywhere, so validation of the EMA
needs no broadcast); validation is sharded by batches and all-reduced; logging,
checkpoints and samples are rank 0's; a stop signal on any rank stops all after
the same step.
"""

from __future__ import annotations

import copy
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from neuromf.device import autocast_dtype
from neuromf.errors import UserError
from neuromf.seeding import derived_generator
from neuromf.spec.schema import RunSpec
from neuromf.train.checkpoint import CheckpointDir
from neuromf.train.distributed import Dist, is_collective_error, setup_distributed
from neuromf.train.ema import EMA
from neuromf.train.periodic_eval import periodic_evaluation, periodic_evaluation_due
from neuromf.train.resume import check_compatible, claim_run_folder, load_resume_state
from neuromf.train.run_log import RunLog, SilentLog
from neuromf.train.runtime import configure_torch
from neuromf.train.schedule import build_optimizer, build_scheduler
from neuromf.train.signals import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, StopInterrupt, StopRequest
from neuromf.train.state import Progress, checkpoint_state, restore_state
from neuromf.train.validate import validate

__all__ = ["ComputeFn", "Trainer", "TrainingDiverged", "chunk_generator", "train"]

# loss.compute(net, z0, e, t, r, grad_net=..., autocast_dtype=...): the pure part of the loss, eager or compiled
ComputeFn = Callable[..., dict[str, torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """The (e, t, r) generator of chunk `chunk` (rank * accumulate + micro) of optimizer step `step`."""
    return derived_generator(device, "loss", seed, step, chunk)


# ---------------------------------------------------------------- the run


class Trainer:
    """Holds the run's objects; `run()` is the loop, `train_step()` one optimizer step."""

    def __init__(
        self, spec: RunSpec, resume: str | None = None, dry_run: bool = False, verify_data: bool = False
    ) -> None:
        from neuromf.data.prepare import check_run_data, prepare_data
        from neuromf.meanflow.time_sampler import num_flow_matching
        from neuromf.model.unet import build_network, set_gradient_checkpointing

        self.spec, self.dry_run = spec, dry_run
        self.dist = setup_distributed(spec)  # one process unless torchrun/srun started several
        self.device = self.dist.device
        configure_torch(spec, self.device)
        self.dtype = autocast_dtype(spec, self.device)
        world, rank = self.dist.world_size, self.dist.rank
        # Lock, tidy and pick the checkpoint before anything is built or packed: a refusal changes nothing on disk.
        self.checkpoints = CheckpointDir(spec.paths.run_dir, spec.checkpoint.keep_last)
        resuming = resume is not None and not dry_run
        self.run_lock = claim_run_folder(spec, self.checkpoints, resuming, self.dist, dry_run)
        found = load_resume_state(resume, self.checkpoints, self.dist, self.device) if resuming else None
        if found is not None:
            check_compatible(spec, *found)
        with self.dist.main_first("preparing the data"):  # rank 0 packs the shard; the others only read it
            # rank 0 checks the shard's checksum once per shard file (every time with --verify-data) before reading it
            verify = ("always" if verify_data else "once") if self.dist.is_main and not dry_run else None
            self.data = prepare_data(
                spec, self.device, pack=self.dist.is_main, progress=self.dist.is_main, verify=verify
            )
            if self.dist.is_main and not dry_run:  # writes split.json; refuses a resume whose split changed
                check_run_data(spec, self.data, resume=resume)
        # training.batch_size is the GLOBAL batch: each rank takes its block of batch_size / world_size.
        self.batches = self.data.train_batches(spec.training.batch_size // world, rank=rank, world_size=world)
        self.micro_batch = spec.training.batch_size // (world * spec.training.accumulate_grad_batches)
        self.val_batches = self.data.val_batches(self.micro_batch) if self.data.val_names else None
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = 1 if dry_run else spec.training.total_steps(self.steps_per_epoch)
        if not dry_run and spec.training.warmup_steps >= self.total_steps:
            raise UserError(
                f"training.warmup_steps: {spec.training.warmup_steps} is not shorter than the run ({self.total_steps} steps)"
            )

        self.net = build_network(spec.model).to(self.device)
        if spec.model.init_from is not None:
            from neuromf.model.warm_start import load_pretrained_backbone

            load_pretrained_backbone(
                self.net,
                spec.model.init_from,
                spacing_mm=spec.model.init_spacing_mm,
                class_label=spec.model.init_class_label,
            )
        # gradient passes only, never the JVP
        set_gradient_checkpointing(self.net, spec.training.gradient_checkpointing)
        self._build_step_parts(self.total_steps)
        if spec.training.compile:  # lazy: a failure surfaces at the first step (then eager: _train_step_or_eager)
            from neuromf.train.compile import compile_loss  # imports Inductor (~1 s): only when compiling

            self.compute = compile_loss(self.loss.compute, spec.training.fold_zero_tangents, spec.training.compile_mode)
        # validation and samples load the EMA into it
        self.ema_net = copy.deepcopy(self.net).eval().requires_grad_(False)
        if found is not None:
            restore_state(self, found[1])
        self.interruptible: Callable[[], Any] = nullcontext
        # Wrapped after loading, so DDP's initial broadcast (rank 0's weights to all) sends the resumed ones.
        if self.dist.enabled:
            with self.dist.guard("wrapping the model in DDP (broadcast of rank 0's weights)"):
                self.grad_net = DistributedDataParallel(
                    self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
                )
        self.log: Any = (
            RunLog(spec, self.total_steps, self.progress.global_step, resumed=found is not None)
            if self.dist.is_main
            else SilentLog()
        )
        if found is not None:
            self.log.event(self.progress.global_step, f"resumed from {found[0]} at step {self.progress.global_step}")
        if world > 1:
            self.log.say(
                f"{world} processes ({self.dist.launcher}, {'NCCL' if self.device.type == 'cuda' else 'gloo'}): "
                f"global batch {spec.training.batch_size} = {world} x {spec.training.accumulate_grad_batches} "
                f"micro-batch(es) of {self.micro_batch}"
            )
        if (
            num_flow_matching(self.micro_batch, spec.time_sampling.data_proportion)
            == 0
            < spec.time_sampling.data_proportion
        ):
            self.log.say(
                f"warning: micro-batches of {self.micro_batch} get no r = t rows (floor({self.micro_batch} x "
                f"time_sampling.data_proportion {spec.time_sampling.data_proportion}) = 0): all rows are MeanFlow rows"
            )

    @classmethod
    def for_steps(cls, spec: RunSpec, net: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Trainer:
        """A trainer of `net` with only what train_step uses: one process, the eager loss, no data, run folder,
        log or checkpoints. `neuromf doctor` and `neuromf bench` measure the training step with it (bench sets
        `compute` and `loss` to other loss maths). Its LR schedule is that of a run of max_steps (or warmup + 1) steps."""
        # not __init__: that prepares the data, claims the run folder and builds its own network
        self = cls.__new__(cls)
        self.spec, self.device, self.dtype = spec, device, dtype
        self.dist = Dist(rank=0, world_size=1, local_rank=0, device=device)
        self.net, self.log = net, SilentLog()
        self._build_step_parts(max(spec.training.max_steps or 0, spec.training.warmup_steps + 1))
        return self

    def _build_step_parts(self, total_steps: int) -> None:
        """What train_step works with, for self.net: the loss (eager), EMA, AdamW, LR schedule and the counters."""
        from neuromf.meanflow.loss import MeanFlowLoss

        spec = self.spec
        self.loss = MeanFlowLoss(spec.meanflow, spec.time_sampling, spec.model.prediction_type)
        self.compute: ComputeFn = self.loss.compute
        # Every rank keeps the EMA: the weights are the same on all, so are the averages, and sharded
        # validation of the EMA needs no broadcast.
        self.ema = EMA(self.net, spec.ema.decay, spec.ema.half_lives)
        self.optimizer = build_optimizer(list(self.net.parameters()), spec.training, self.device)
        self.scheduler = build_scheduler(self.optimizer, total_steps, spec.training)
        self.progress = Progress()
        self.grad_net: torch.nn.Module = self.net  # the DDP wrapper in a multi-process run (__init__)

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, batch: torch.Tensor) -> tuple[bool, dict[str, torch.Tensor]]:
        """One optimizer step on this rank's block of the global batch. Returns (applied, metrics).

        Micro-batch i is chunk c = rank * accumulate + i of the global batch; its noise and times come
        from chunk_generator(seed, global_step, c). The gradient passes run through `grad_net` (DDP with
        several processes: it all-reduces the gradients after the LAST micro-batch, no_sync before), the
        no-grad JVP on the bare `net` (inside `compute`). Clipping and the NaN/Inf guard then see the
        synchronised gradients and the metrics are averaged over the ranks, so every rank decides alike.
        """
        tr, p = self.spec.training, self.progress
        accumulate = tr.accumulate_grad_batches
        micros = batch.chunk(accumulate)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(micros):
            noise = chunk_generator(tr.seed, p.global_step, self.dist.rank * accumulate + i, self.device)
            e, t, r = self.loss.draw(micro, noise)  # the randomness, outside the compiled part
            defer_sync = isinstance(self.grad_net, DistributedDataParallel) and i < len(micros) - 1
            with self.grad_net.no_sync() if defer_sync else nullcontext():  # type: ignore[operator]
                out = self.compute(self.net, micro, e, t, r, grad_net=self.grad_net, autocast_dtype=self.dtype)
                (out["loss_total"] / accumulate).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accumulate
        clip = tr.grad_clip if tr.grad_clip is not None else math.inf
        # the norm before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_([q for q in self.net.parameters() if q.grad is not None], clip)
        grad_ok = True
        # one all-reduce: the mean of each metric, and how many ranks saw a non-finite gradient norm
        if self.dist.enabled:
            keys = list(sums)
            packed = torch.stack([sums[k] for k in keys] + [(~torch.isfinite(grad_norm)).float()]).double()
            self.dist.all_reduce(packed, "sum", "the step's metrics all-reduce")
            sums = {k: (packed[i] / self.dist.world_size).float() for i, k in enumerate(keys)}
            grad_ok = bool(packed[-1] == 0)
        sums["grad_norm"] = grad_norm
        if not (grad_ok and bool(torch.isfinite(sums["loss_total"]) & torch.isfinite(grad_norm))):  # one sync per step
            # NaN/Inf guard: no update; max_bad_steps in a row end the run (the last checkpoint is finite).
            self.optimizer.zero_grad(set_to_none=True)
            p.bad_steps += 1
            p.consecutive_bad += 1
            self.log.event(
                p.global_step,
                f"skipped a step with NaN/Inf loss or gradients ({p.consecutive_bad} in a row, {p.bad_steps} in all)",
                bad_step=True,
            )
            if p.consecutive_bad >= tr.max_bad_steps:
                raise TrainingDiverged(
                    f"training stopped: {p.consecutive_bad} consecutive steps with NaN/Inf loss or "
                    "gradients (training.max_bad_steps)"
                )
            return False, sums
        self.optimizer.step()
        self.scheduler.step()
        if p.global_step % self.spec.ema.update_every == 0:
            self.ema.update(self.net)
        p.global_step += 1
        p.consecutive_bad = 0
        return True, sums

    def _train_step_or_eager(self, batch: torch.Tensor) -> tuple[bool, dict[str, torch.Tensor]]:
        """train_step; a failed torch.compile (it surfaces at the first step) must not cost the run: say so
        once and redo the step eagerly (slower, same maths; train_step zeroes the gradients first)."""
        try:
            return self.train_step(batch)
        except Exception as e:
            if self.compute == self.loss.compute or is_collective_error(e) or isinstance(e, TrainingDiverged):
                raise
            first = str(e).splitlines()[0][:200] if str(e) else ""
            self.log.event(
                self.progress.global_step, f"torch.compile failed ({type(e).__name__}: {first}); falling back to eager"
            )
            self.compute = self.loss.compute
            return self.train_step(batch)

    # ------------------------------------------------------------ checkpoints

    def save_latest(self) -> Path:
        """Write checkpoints/latest.pt (rank 0 only: the state is the same on every rank)."""
        if not self.dist.is_main:
            return self.checkpoints.latest
        path = self.checkpoints.save_latest(checkpoint_state(self))
        self.log.write_summary()
        return path

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        """The loop: batch -> train_step -> log -> (epoch end: validation, checkpoints, samples) -> stop check."""
        spec, p = self.spec, self.progress
        log_every = spec.logging.log_every_n_steps
        if p.finished and p.global_step >= self.total_steps and not self.dry_run:
            self.log.say(
                f"{spec.name} already finished at step {p.global_step} (raise training.max_steps to train longer); "
                f"samples in {spec.paths.run_dir / 'samples'}"
            )
            self.log.close()
            return 0
        self.log.say(
            f"training {spec.name}: {self.total_steps} steps, {self.steps_per_epoch} per epoch, on {self.device}"
        )
        window_t0, window_samples, epoch_sums, epoch_n = time.perf_counter(), 0, {}, 0
        epoch_done = False
        self.net.train()
        with StopRequest() as stop:
            # A stop signal interrupts validation and sampling (redone after resume) instead of waiting for them.
            # Not with several processes: one rank leaving a collective early would hang the others.
            self.interruptible = nullcontext if self.dist.enabled else stop.interruptible
            if p.pending_epoch_end:
                self.log.say(f"redoing the end of epoch {p.pending_epoch_end} (interrupted by a stop signal)")
                self._end_of_epoch(p.pending_epoch_end, final=p.global_step >= self.total_steps)
                epoch_done = True
                if stop.requested and not self.dist.enabled:  # (several processes agree on stops in the loop)
                    return self._stop(stop.requested)
            while p.global_step < self.total_steps:
                batch = self.batches.next_batch()
                applied, metrics = self._train_step_or_eager(batch)
                window_samples += batch.shape[0] * self.dist.world_size  # latents of the global batch
                if applied:  # summed on the device: a float() here would wait for the GPU at every step
                    for k in ("loss_total", "mse_fm", "mse_mf"):
                        epoch_sums[k] = epoch_sums.get(k, 0.0) + metrics[k].detach().double()
                    epoch_n += 1

                logging_step = applied and (p.global_step % log_every == 0 or p.global_step == 1)
                if logging_step:
                    elapsed = time.perf_counter() - window_t0
                    record = {"step": p.global_step, "epoch": p.epoch, "train/lr": self.scheduler.get_last_lr()[0]}
                    record.update({f"train/{k}": float(v) for k, v in metrics.items()})
                    record["train/latents_per_s"] = window_samples / elapsed if elapsed > 0 else 0.0
                    if self.device.type == "cuda":
                        record["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.log.log(record)
                    window_t0, window_samples = time.perf_counter(), 0
                self.log.progress(
                    p.global_step,
                    p.epoch,
                    {f"train/{k}": float(v) for k, v in metrics.items() if k.startswith(("loss_total", "mse"))}
                    if logging_step or self.log.use_bar
                    else {},
                    logging_step,
                )

                if self.dry_run:
                    self.log.say(f"dry run: one step done, loss {float(metrics['loss_total']):.4f}")
                    self.log.close()
                    return 0
                epoch_done = self.batches.position >= self.steps_per_epoch
                if epoch_done:
                    p.epoch = self.batches.epoch + 1  # epochs completed
                    p.history["train"].append(
                        {"epoch": p.epoch, **{k: float(v) / max(epoch_n, 1) for k, v in epoch_sums.items()}}
                    )
                    epoch_sums, epoch_n = {}, 0
                    self._end_of_epoch(p.epoch, final=p.global_step >= self.total_steps)
                elif p.global_step % spec.checkpoint.latest_every_n_steps == 0 and applied:
                    self.save_latest()
                # A signal may reach one rank only (or each at a different step): the largest signal number
                # over all ranks, once per step, so that all stop after the same step.
                requested = self.dist.max_int(
                    signal.Signals[stop.requested].value if stop.requested else 0, "sharing stop requests"
                )
                if requested:
                    return self._stop(signal.Signals(requested).name)
            if not epoch_done:  # max_steps ended inside epoch p.epoch + 1: validate, sample and save it as that
                self._end_of_epoch(p.epoch + 1, final=True)
                if p.pending_epoch_end and not self.dist.enabled:  # interrupted by a stop: save it as pending
                    return self._stop(stop.requested or "SIGTERM")
        self.log.say(
            f"done: {p.global_step} steps; checkpoints in {self.checkpoints.folder}, samples in {spec.paths.run_dir / 'samples'}"
        )
        self.log.close()
        return 0

    def _stop(self, name: str) -> int:
        """A stop signal: save latest.pt (with any interrupted epoch end marked pending), exit 75 (or 130)."""
        p = self.progress
        code = INTERRUPT_EXIT_CODE if name == "SIGINT" else REQUEUE_EXIT_CODE
        path = self.save_latest()
        pending = (
            f" (epoch {p.pending_epoch_end}'s validation/samples are redone on resume)" if p.pending_epoch_end else ""
        )
        self.log.event(p.global_step, f"{name}: saved {path} at step {p.global_step}{pending}; exiting with {code}")
        self.log.close()
        return code

    def _end_of_epoch(self, epoch: int, final: bool) -> None:
        """Epoch `epoch` (counted from 1) just ended: validation, checkpoints and samples as the run-spec asks.

        A stop signal during validation or sampling leaves `pending_epoch_end` set (the caller saves and exits)."""
        spec, p = self.spec, self.progress
        p.pending_epoch_end = epoch
        try:
            validated = bool(p.history["val"]) and p.history["val"][-1].get("epoch") == epoch  # (a redo after a stop)
            if (final or epoch % spec.logging.val_every_n_epochs == 0) and not validated:
                validate(self, epoch)
            if self.dist.is_main and (final or epoch % spec.checkpoint.save_every_n_epochs == 0):
                self.checkpoints.save_epoch(checkpoint_state(self), epoch)
            if self.dist.is_main and (final or epoch % spec.sampling.every_n_epochs == 0):
                self._samples(epoch)  # the other ranks go on and wait in the next step's all-reduce
            if self.dist.is_main and periodic_evaluation_due(spec, epoch, final):
                self.ema_net.load_state_dict(self.ema.state_dict(), strict=False)
                with self.interruptible():
                    self.log.log(periodic_evaluation(spec, self.ema_net, self.data, epoch, p.global_step, self.device))
        except StopInterrupt:
            return
        p.pending_epoch_end = 0
        p.finished = final
        self.save_latest()

    def _samples(self, epoch: int) -> None:
        from neuromf.train.epoch_samples import write_periodic_samples

        self.ema_net.load_state_dict(self.ema.state_dict(), strict=False)
        nets = {"ema": self.ema_net, "online": self.net}
        with self.interruptible():
            folder = write_periodic_samples(
                self.spec, {w: nets[w] for w in self.spec.sampling.weights}, self.data.stats, epoch, self.device
            )
        self.log.event(self.progress.global_step, f"samples of epoch {epoch} in {folder}")
        self.log.log_images(
            self.progress.global_step,
            epoch,
            {p.name.removesuffix("_grid.png"): p for p in sorted(folder.glob("*_grid.png"))},
        )


def train(spec: RunSpec, resume: str | None = None, dry_run: bool = False, verify_data: bool = False) -> int:
    """Train (one process, or one rank of a torchrun/srun launch); the exit code of `neuromf train`."""
    trainer = Trainer(spec, resume=resume, dry_run=dry_run, verify_data=verify_data)
    try:
        code = trainer.run()
    except TrainingDiverged as e:
        trainer.log.event(
            trainer.progress.global_step, f"{e}; the last good checkpoint is in {trainer.checkpoints.folder}"
        )
        trainer.log.close()
        code = 3
    finally:
        if trainer.run_lock is not None:
            trainer.run_lock.release()
    if trainer.dist.enabled and code in (REQUEUE_EXIT_CODE, INTERRUPT_EXIT_CODE):
        # Rank 0 has saved. srun --kill-on-bad-exit TERMs the other tasks as soon as one exits non-zero, which
        # would turn this rank's 75 into "Terminated" (no requeue): ignore TERM from here, and let no rank
        # leave before every rank does.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        trainer.dist.barrier("waiting for every rank after the stop checkpoint")
    # Only after a clean end: after a failed collective the group may be unusable (the process exits anyway).
    trainer.dist.close()
    return code
