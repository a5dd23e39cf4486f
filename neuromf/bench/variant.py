"""One bench variant from set-up to result (`VariantRun`), and running several side by side (`run_variants`).

Each variant steps with the trainer's own `Trainer.train_step` (neuromf/train/loop.py) on a trainer of
its own copy of the network (`Trainer.for_steps`: AdamW, LR schedule, EMA), with its loss maths and
compilation plugged in as the trainer's `compute` (and, for the predecessor, its `loss`, which draws
(e, t, r)), and its own batch iterator; `neuromf/bench/run.py` builds what they share (`BenchSetup`)
and the report.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from neuromf.bench.measure import MemoryMeter, StepClock, count_flops, top_kernels
from neuromf.errors import UserError

if TYPE_CHECKING:
    from neuromf.bench.run import BenchSetup

__all__ = ["COMPARE_VARIANTS", "VARIANTS", "Variant", "VariantRun", "check_variant_names", "run_variants"]


@dataclass(frozen=True)
class Variant:
    """What a bench variant runs: which loss maths, compiled or not, with the zero-tangent fold or not."""

    description: str
    math: str  # "predecessor", "naive", "imf", "imf_const_params" or "fm" (BenchSetup.math)
    compiled: bool = False
    fold: bool = True  # with compiled: training.fold_zero_tangents applies (False: never fold)


VARIANTS: dict[str, Variant] = {
    "predecessor": Variant(
        "the predecessor's step: no-grad v_tilde, whole-batch graph-building JVP, L_MF only, eager", "predecessor"
    ),
    "naive": Variant("naive iMF reference: whole-batch graph-building torch.func.jvp, L_FM + L_MF, eager", "naive"),
    "eager": Variant("our iMF step: no-grad JVP on the r != t rows + two gradient passes, eager", "imf"),
    "compiled": Variant("our iMF step, torch.compile", "imf", compiled=True),
    "fm": Variant("plain flow-matching step of the same network (the floor), eager", "fm"),
    "fm_compiled": Variant("plain flow-matching step, torch.compile", "fm", compiled=True),
    "eager_const_params": Variant(
        "our iMF step, eager, with every parameter a constant of the JVP (A/B of the dual biases, docs/design.md)",
        "imf_const_params",
    ),
    "compiled_nofold": Variant(
        "our iMF step, torch.compile without the zero-tangent fold (A/B of training.fold_zero_tangents)",
        "imf",
        compiled=True,
        fold=False,
    ),
}
COMPARE_VARIANTS = ["predecessor", "naive", "eager", "compiled", "fm", "fm_compiled"]  # --compare


def check_variant_names(names: list[str]) -> None:
    """UserError naming any unknown variant (before any set-up)."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "all": values,
    }


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _error_text(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}"


class VariantRun:
    """One variant: its trainer (copy of the network, AdamW, schedule, EMA, (compiled) loss), batch iterator and timings."""

    def __init__(self, b: BenchSetup, name: str) -> None:
        from neuromf.model.unet import set_gradient_checkpointing
        from neuromf.train.compile import compile_loss
        from neuromf.train.loop import Trainer

        self.b, self.name = b, name
        spec, opt = b.spec, b.options
        variant = VARIANTS[name]
        self.math_kind, compiled = variant.math, variant.compiled
        # Checkpointing inside a graph-building JVP (naive, predecessor) raises; it is the gradient passes' option.
        ckpt = spec.training.gradient_checkpointing and variant.math not in ("naive", "predecessor")
        self.result: dict[str, Any] = {
            "name": name,
            "description": variant.description,
            "compiled": compiled,
            "gradient_checkpointing": ckpt,
            "channels_last": opt.channels_last,
            "error": None,
        }
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.cpu: list[float] = []  # CPU seconds per step (CPU devices only)
        self.recompiles = 0
        self.last: dict[str, Any] = {}
        self.net: Any = None
        self.trainer: Any = None
        self.batches: Any = None
        try:
            self.net = copy.deepcopy(b.base)
            if opt.channels_last:
                self.net = self.net.to(memory_format=torch.channels_last_3d)
            set_gradient_checkpointing(self.net, ckpt)
            self.net.train()
            self.trainer = Trainer.for_steps(spec, self.net, b.device, b.dtype)
            self.eager_fn = b.math[self.math_kind]
            fold = spec.training.fold_zero_tangents and variant.fold
            mode = opt.compile_mode or spec.training.compile_mode
            self.result["compile_mode"] = mode if compiled else None
            self.trainer.compute = compile_loss(self.eager_fn, fold, mode) if compiled else self.eager_fn
            self.trainer.loss = b.draw_loss.get(self.math_kind, self.trainer.loss)  # draws (e, t, r)
            self.batches = b.make_batches()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the weights: report it
            self.fail(e)

    @property
    def ok(self) -> bool:
        return self.result["error"] is None

    def fail(self, e: BaseException) -> None:
        self.result["error"] = _error_text(e)
        self.close()

    def step(self, batch: torch.Tensor) -> None:
        if self.b.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        self.last["applied"], self.last["metrics"] = self.trainer.train_step(batch)
        self.last["skipped"] = self.trainer.progress.bad_steps  # steps with NaN/Inf loss or gradients

    def warm_up(self) -> None:
        """The first step (compilation included) and `warmup` more, untimed."""
        start = time.perf_counter()
        self.step(self.batches.next_batch())
        self.b.sync()
        self.result["first_step_s"] = time.perf_counter() - start
        self.result["first_step"] = {k: float(v) for k, v in self.last["metrics"].items()}
        for _ in range(self.b.options.warmup):
            self.step(self.batches.next_batch())
        self.b.sync()

    def timed(self, n: int) -> None:
        clock = StepClock(self.b.device)
        graphs = _unique_graphs()
        for _ in range(n):
            w, s, cpu = clock.iteration(self.batches.next_batch, self.step)
            self.waits.append(w)
            self.steps.append(s)
            if cpu is not None:
                self.cpu.append(cpu)
        self.recompiles += _unique_graphs() - graphs

    def memory(self) -> None:
        """Peak memory of one more step."""
        meter = MemoryMeter(self.b.device)
        meter.start()
        self.step(self.batches.next_batch())
        self.result.update(meter.stop())

    def profile(self) -> None:
        """The ops that dominate one more step (--profile N)."""
        batch = self.batches.next_batch()
        self.result["profile"] = top_kernels(lambda: self.step(batch), self.b.device, self.b.options.profile)

    def count_flops(self) -> None:
        """Model FLOPs of one step: the eager twin, checkpointing off (recomputation is not model work)."""
        from neuromf.model.unet import set_gradient_checkpointing

        if self.math_kind not in self.b.flops:
            set_gradient_checkpointing(self.net, False)
            batch = self.batches.next_batch()
            compute, self.trainer.compute = self.trainer.compute, self.eager_fn
            self.b.flops[self.math_kind] = count_flops(lambda: self.step(batch))
            self.trainer.compute = compute

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        self.net = self.trainer = self.batches = None
        gc.collect()
        if self.b.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, phase: Callable[..., None], *args: Any) -> None:
        """Run one phase unless the variant already failed; a failure is recorded and frees the variant."""
        if not self.ok:
            return
        try:
            phase(*args)
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            self.fail(e)

    def finish(self) -> dict[str, Any]:
        result = self.result
        if not self.ok:
            return result
        result["recompiles_during_timing"] = self.recompiles
        result["skipped_steps"] = self.last["skipped"]
        result["step_s"] = _summary(self.steps)
        result["step_cpu_s"] = _summary(self.cpu) if self.cpu else None
        result["data_wait_s"] = _summary(self.waits)
        result["data_wait_fraction"] = sum(self.waits) / (sum(self.waits) + sum(self.steps))
        median = result["step_s"]["median"]
        result["latents_per_s"] = self.b.batch_size / median
        flops = self.b.flops.get(self.math_kind)
        result["flops_per_step"] = flops
        result["flops_per_latent"] = flops / self.b.batch_size if flops else None
        # the step in units of one forward pass of one latent: ~3 for FM, ~7.5 for our iMF step
        fwd = self.b.forward_flops_per_latent()
        result["forward_equivalents_per_latent"] = flops / self.b.batch_size / fwd if flops and fwd else None
        result["achieved_tflops"] = flops / median / 1e12 if flops else None
        return result


def run_variants(b: BenchSetup, names: list[str], steps: int, interleave: bool) -> list[dict[str, Any]]:
    """Sequential: each variant start to end, then the next (alone in memory). Interleaved: all set up, warmed
    up, then timed one step each in turn, so a busy shared machine slows them alike."""
    results = []
    if not interleave:
        for name in names:
            run = VariantRun(b, name)
            for phase, args in ((run.warm_up, ()), (run.timed, (steps,)), (run.memory, ()), (run.count_flops, ())):
                run.run(phase, *args)
            if b.options.profile:
                run.run(run.profile)
            run.close()
            results.append(run.finish())
        return results
    runs = [VariantRun(b, name) for name in names]
    for run in runs:
        run.run(run.warm_up)
    for _ in range(steps):
        for run in runs:
            run.run(run.timed, 1)
    for run in runs:
        run.run(run.memory)
        run.run(run.count_flops)
        if b.options.profile:
            run.run(run.profile)
        run.close()
        results.append(run.finish())
    return results
