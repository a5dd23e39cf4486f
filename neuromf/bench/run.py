"""`neuromf bench`: time whole optimizer steps of one or several step variants on the same inputs.

Every variant runs the trainer's own `train_step` (micro-batches, backward,
clipping, AdamW) on its own copy of one freshly built network, with the same
batches (a fresh batch iterator of the same data order) and the same noise and
times (a generator reseeded with training.seed); only the loss function and its
compilation differ:

    naive        the predecessor's step: whole-batch graph-building torch.func.jvp, eager
    eager        our iMF step: no-grad JVP on the r != t rows, two gradient passes, eager
    compiled     the same step, torch.compile'd (what `neuromf train` runs with training.compile)
    fm           plain flow matching with the same network: the floor of any step, eager
    fm_compiled  the same, torch.compile'd

Per variant: the first step (compile included) and `warmup` more steps untimed;
`steps` timed iterations (data fetch and step timed apart); one more step for
peak memory; one more eager step under FlopCounterMode (checkpointing off, so
the count is model FLOPs). A variant that fails (out of memory, compile error)
is reported as such and the others still run.

By default the variants run one after the other, each alone in memory (the
GPU peaks are then each variant's own). `interleave` sets all of them up and
times them one step each in turn, so that load from other processes on a
shared machine slows every variant alike; its absolute peaks include the
other variants' weights and optimizer states (its per-step peaks do not).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from neuromf.bench.measure import MemoryMeter, StepClock, count_flops, describe_device, peak_flops, versions
from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = ["BenchOptions", "VARIANTS", "bench", "default_variants"]

VARIANTS: dict[str, str] = {
    "naive": "naive iMF reference: whole-batch graph-building torch.func.jvp, eager",
    "eager": "our iMF step: no-grad JVP on the r != t rows + two gradient passes, eager",
    "compiled": "our iMF step, torch.compile",
    "fm": "plain flow-matching step of the same network (the floor), eager",
    "fm_compiled": "plain flow-matching step, torch.compile",
}
# Latents per epoch assumed with synthetic data: the seed's Picasso plan, 45 steps of 24.
SYNTHETIC_EPOCH_LATENTS = 1080


@dataclass
class BenchOptions:
    """How to bench; the model, batch, precision and compile settings come from the run-spec."""

    steps: int = 10
    warmup: int = 2
    variants: Optional[list[str]] = None  # None: the step `neuromf train` would run (see default_variants)
    data: str = "spec"  # "spec": the run-spec's data through the trainer's loader; "synthetic": N(0, 1) on the device
    channels_last: bool = False  # network and batches in torch.channels_last_3d
    peak_tflops: Optional[float] = None  # overrides the peak table (e.g. for a CPU)
    epoch_latents: Optional[int] = None  # for the projection; default: the train split (synthetic: 1080)
    interleave: bool = False  # time the variants one step each in turn (fair on a busy shared machine)
    on_variant: Optional[Callable[[str, dict[str, Any]], None]] = field(default=None, repr=False)  # progress hook


def default_variants(spec: RunSpec, compare: bool) -> list[str]:
    """--compare: all five; otherwise the trainer's own step (compiled when training.compile)."""
    if compare:
        return list(VARIANTS)
    return ["compiled" if spec.training.compile else "eager"]


class _SyntheticBatches:
    """Fixed-shape normalised-looking batches already on the device: no loader, data wait ~0."""

    def __init__(self, shape: tuple[int, ...], batch: int, device: torch.device, seed: int, epoch_latents: int) -> None:
        g = torch.Generator(device).manual_seed(seed)
        self._pool = [torch.randn((batch, *shape), generator=g, device=device) for _ in range(2)]
        self._i = 0
        self.steps_per_epoch = max(1, epoch_latents // batch)

    def next_batch(self) -> torch.Tensor:
        self._i += 1
        return self._pool[self._i % len(self._pool)]

    def close(self) -> None:
        self._pool = []


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


class _Bench:
    """The shared set-up (device, data, base network, loss functions) and one method per variant."""

    def __init__(self, spec: RunSpec, options: BenchOptions) -> None:
        from neuromf.meanflow.loss import MeanFlowLoss
        from neuromf.meanflow.reference import flow_matching_loss, naive_imf_loss
        from neuromf.model.unet import build_network, count_parameters
        from neuromf.train.runtime import autocast_dtype, configure_torch, pick_device

        self.spec, self.options = spec, options
        self.device = pick_device(spec)
        configure_torch(spec, self.device)
        self.dtype = autocast_dtype(spec, self.device)
        tr = spec.training
        self.batch_size, self.micro = tr.batch_size, tr.micro_batch_size
        self.data: Any = None
        if options.data == "synthetic":
            shape = (spec.model.in_channels, *spec.model.spatial_size)
            latents = options.epoch_latents or SYNTHETIC_EPOCH_LATENTS
            self.make_batches: Callable[[], Any] = lambda: _SyntheticBatches(shape, self.batch_size, self.device, tr.seed, latents)
            self.residency = "synthetic (on the device)"
        elif options.data == "spec":
            from neuromf.data.loader import prepare_data

            self.data = prepare_data(spec, self.device, progress=False)
            self.make_batches = lambda: self.data.train_batches(self.batch_size)
            self.make_batches().close()  # a split smaller than one batch is a UserError: raise it now
            self.residency = self.data.residency
        else:
            raise UserError(f"--data: {options.data!r} is not one of spec, synthetic")
        torch.manual_seed(tr.seed)
        self.base = build_network(spec.model).to(self.device)
        self.parameters = count_parameters(self.base)
        # The trainer's loss object (no finiteness check: the step skips non-finite updates instead).
        self.loss = MeanFlowLoss(spec.meanflow, spec.time_sampling, spec.model.prediction_type, check_finite=False)
        bound = dict(mf=spec.meanflow, prediction_type=spec.model.prediction_type)
        self.math: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
            "naive": functools.partial(naive_imf_loss, **bound),
            "imf": self.loss.compute,
            "fm": functools.partial(flow_matching_loss, **bound),
        }
        self.flops: dict[str, int] = {}

    def forward_flops_per_latent(self) -> Optional[int]:
        """FLOPs of one forward pass per latent (no grad), counted once on one micro-batch of zeros."""
        if "forward" not in self.flops:
            shape = (self.micro, self.spec.model.in_channels, *self.spec.model.spatial_size)
            x = torch.zeros(shape, device=self.device)
            t = torch.full((self.micro,), 0.5, device=self.device)
            with torch.no_grad():
                self.flops["forward"] = count_flops(lambda: self.base(x, t, t)) // self.micro
        return self.flops["forward"]

    @staticmethod
    def kind(name: str) -> tuple[str, bool]:
        """(the loss maths, compiled?) of a variant."""
        return {"naive": ("naive", False), "eager": ("imf", False), "compiled": ("imf", True),
                "fm": ("fm", False), "fm_compiled": ("fm", True)}[name]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)



class _VariantRun:
    """One variant: its copy of the network, optimizer, (compiled) loss, batch iterator, generator and timings."""

    def __init__(self, b: _Bench, name: str) -> None:
        from neuromf.model.unet import set_gradient_checkpointing
        from neuromf.train.schedule import build_optimizer

        self.b, self.name = b, name
        spec, opt = b.spec, b.options
        self.math_kind, compiled = b.kind(name)
        # Checkpointing inside the naive step's graph-building JVP raises; it is the gradient passes' option.
        ckpt = spec.training.gradient_checkpointing and name != "naive"
        self.result: dict[str, Any] = {"name": name, "description": VARIANTS[name], "compiled": compiled,
                                       "gradient_checkpointing": ckpt, "channels_last": opt.channels_last, "error": None}
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.cpu: list[float] = []  # CPU seconds per step (CPU devices only)
        self.recompiles = 0
        self.last: dict[str, Any] = {}
        self.net: Any = None
        self.batches: Any = None
        try:
            self.net = copy.deepcopy(b.base)
            if opt.channels_last:
                self.net = self.net.to(memory_format=torch.channels_last_3d)
            set_gradient_checkpointing(self.net, ckpt)
            self.net.train()
            self.optimizer = build_optimizer(list(self.net.parameters()), spec.training, b.device)
            self.eager_fn = b.math[self.math_kind]
            self.compute = torch.compile(self.eager_fn) if compiled else self.eager_fn
            self.batches = b.make_batches()
            self.generator = torch.Generator(b.device).manual_seed(spec.training.seed)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for the weights: report it
            self.fail(e)

    @property
    def ok(self) -> bool:
        return self.result["error"] is None

    def fail(self, e: BaseException) -> None:
        self.result["error"] = _error_text(e)
        self.close()

    def step(self, batch: torch.Tensor, fn: Optional[Callable[..., dict[str, torch.Tensor]]] = None) -> None:
        from neuromf.train.step import train_step

        if self.b.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        applied, metrics = train_step(self.b.loss, fn or self.compute, self.net, batch, self.generator, self.optimizer,
                                      self.b.spec, self.b.dtype)
        self.last["applied"], self.last["metrics"] = applied, metrics

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

    def count_flops(self) -> None:
        """Model FLOPs of one step: the eager twin, checkpointing off (recomputation is not model work)."""
        from neuromf.model.unet import set_gradient_checkpointing

        if self.math_kind not in self.b.flops:
            set_gradient_checkpointing(self.net, False)
            batch = self.batches.next_batch()
            self.b.flops[self.math_kind] = count_flops(lambda: self.step(batch, self.eager_fn))

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()
        self.net = self.optimizer = self.compute = self.batches = None
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
        result["skipped_steps"] = 0 if self.last["applied"] else 1
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


def run_variants(b: _Bench, names: list[str], steps: int, interleave: bool) -> list[dict[str, Any]]:
    """Sequential: each variant start to end, then the next (alone in memory). Interleaved: all set up, warmed
    up, then timed one step each in turn, so a busy shared machine slows them alike."""
    results = []
    if not interleave:
        for name in names:
            run = _VariantRun(b, name)
            for phase, args in ((run.warm_up, ()), (run.timed, (steps,)), (run.memory, ()), (run.count_flops, ())):
                run.run(phase, *args)
            run.close()
            results.append(run.finish())
        return results
    runs = [_VariantRun(b, name) for name in names]
    for run in runs:
        run.run(run.warm_up)
    for _ in range(steps):
        for run in runs:
            run.run(run.timed, 1)
    for run in runs:
        run.run(run.memory)
        run.run(run.count_flops)
        run.close()
        results.append(run.finish())
    return results


def _peak(spec: RunSpec, device: torch.device, override: Optional[float]) -> tuple[Optional[float], str]:
    if override is not None:
        return override * 1e12, "--peak-tflops"
    return peak_flops(device, spec.training.precision)


def _projection(spec: RunSpec, variant: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """Wall time of the run's training steps at this step time (no validation, samples or checkpoints)."""
    from neuromf.train.runtime import total_steps

    total = total_steps(spec, steps_per_epoch)
    per_step = variant["step_s"]["median"] + variant["data_wait_s"]["median"]
    return {
        "variant": variant["name"], "steps_per_epoch": steps_per_epoch, "max_epochs": spec.training.max_epochs,
        "max_steps": spec.training.max_steps, "total_steps": total, "seconds_per_step": per_step,
        "run_hours": total * per_step / 3600,
        "formula": "run_hours = (max_steps or max_epochs * steps_per_epoch) * (median step + median data wait) / 3600",
    }


def bench(spec: RunSpec, options: BenchOptions) -> dict[str, Any]:
    """Run the variants; return every number (the JSON `neuromf bench --json` writes)."""
    from neuromf.bench.report import ratios_and_targets

    names = options.variants or default_variants(spec, compare=False)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if options.steps < 1 or options.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    b = _Bench(spec, options)
    peak, peak_source = _peak(spec, b.device, options.peak_tflops)
    tr = spec.training
    out: dict[str, Any] = {
        "neuromf_bench": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.name,
        "device": describe_device(b.device),
        "versions": versions(),
        "settings": {
            "batch_size": b.batch_size, "micro_batch_size": b.micro, "accumulate_grad_batches": tr.accumulate_grad_batches,
            "latent_shape": [spec.model.in_channels, *spec.model.spatial_size], "channels": list(spec.model.channels),
            "num_res_blocks": spec.model.num_res_blocks, "parameters": b.parameters, "precision": tr.precision,
            "gradient_checkpointing": tr.gradient_checkpointing, "channels_last": options.channels_last,
            "steps": options.steps, "warmup": options.warmup, "interleave": options.interleave, "data": options.data,
            "residency": b.residency,
            "torch_threads": torch.get_num_threads(),
        },
        "peak_flops": peak,
        "peak_source": peak_source,
        "variants": {},
    }
    try:
        for res in run_variants(b, names, options.steps, options.interleave):
            if res["error"] is None:
                res["mfu"] = res["achieved_tflops"] * 1e12 / peak if peak and res["achieved_tflops"] else None
            out["variants"][res["name"]] = res
            if options.on_variant:
                options.on_variant(res["name"], res)
        ok = {n: v for n, v in out["variants"].items() if v["error"] is None}
        main = next((n for n in ("compiled" if tr.compile else "eager", "compiled", "eager") if n in ok), next(iter(ok), None))
        if main is not None:
            if options.data == "synthetic":
                spe = max(1, (options.epoch_latents or SYNTHETIC_EPOCH_LATENTS) // b.batch_size)
            elif options.epoch_latents:
                spe = max(1, options.epoch_latents // b.batch_size)
            else:
                spe = len(b.data.train_names) // b.batch_size
            out["projection"] = _projection(spec, ok[main], spe)
        out.update(ratios_and_targets(out))
    finally:
        if b.data is not None:
            b.data.close()
    return out
