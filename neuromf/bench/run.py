"""`neuromf bench`: time whole optimizer steps of one or several step variants on the same inputs.

Every variant runs the trainer's own step, `Trainer.train_step` (micro-batches,
backward, clipping, NaN/Inf guard, AdamW, LR schedule, EMA), on its own copy of one
freshly built network, with the same batches (a fresh batch iterator of the same
data order) and the same noise and times (the trainer's: a function of
training.seed, the step and the micro-batch); only the loss function and its
compilation differ:

    predecessor  the predecessor's actual step: no-grad v_tilde, whole-batch graph-building JVP, L_MF only, eager
    naive        the textbook step: whole-batch graph-building torch.func.jvp, L_FM + L_MF, eager
    eager        our iMF step: no-grad JVP on the r != t rows, two gradient passes, eager
    compiled     the same step, torch.compile'd (what `neuromf train` runs with training.compile)
    fm           plain flow matching with the same network: the floor of any step, eager
    fm_compiled  the same, torch.compile'd
    compiled_nofold  `compiled` without the zero-tangent fold (not in --compare: the fold's A/B)

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

import dataclasses
import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from neuromf.bench.measure import count_flops, describe_device, peak_flops, versions
from neuromf.bench.predecessor import PredecessorOptions, predecessor_imf_loss
from neuromf.bench.variant import COMPARE_VARIANTS, check_variant_names, run_variants
from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = ["BenchOptions", "BenchSetup", "bench", "default_variants"]

SYNTHETIC_EPOCH_LATENTS = 1080


@dataclass
class BenchOptions:
    """How to bench; the model, batch, precision and compile settings come from the run-spec."""

    steps: int = 10
    warmup: int = 2
    variants: list[str] | None = None  # None: the step `neuromf train` would run (see default_variants)
    data: str = "spec"  # "spec": the run-spec's data through the trainer's loader; "synthetic": N(0, 1) on the device
    channels_last: bool = False  # network and batches in torch.channels_last_3d
    peak_tflops: float | None = None  # overrides the peak table (e.g. for a CPU)
    epoch_latents: int | None = None  # for the projection; default: the train split (synthetic: 1080)
    interleave: bool = False  # time the variants one step each in turn (fair on a busy shared machine)
    profile: int = 0  # > 0: profile one more step per variant and keep its `profile` top ops by self time
    predecessor: PredecessorOptions = field(default_factory=PredecessorOptions)  # the predecessor variant's settings
    compile_mode: str | None = None  # None: training.compile_mode
    on_variant: Callable[[str, dict[str, Any]], None] | None = field(default=None, repr=False)  # progress hook


def default_variants(spec: RunSpec, compare: bool) -> list[str]:
    """--compare: the five of COMPARE_VARIANTS; otherwise the trainer's own step (compiled when training.compile)."""
    if compare:
        return list(COMPARE_VARIANTS)
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


class BenchSetup:
    """What the variants share: device, data, the base network, the loss functions and FLOP counts."""

    def __init__(self, spec: RunSpec, options: BenchOptions) -> None:
        from neuromf.bench.reference import as_compute, flow_matching_loss, naive_imf_loss
        from neuromf.device import autocast_dtype, pick_device
        from neuromf.meanflow.loss import MeanFlowLoss
        from neuromf.model.unet import build_network, count_parameters
        from neuromf.train.runtime import configure_torch

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
            self.make_batches: Callable[[], Any] = lambda: _SyntheticBatches(
                shape, self.batch_size, self.device, tr.seed, latents
            )
            self.residency = "synthetic (on the device)"
        elif options.data == "spec":
            from neuromf.data.prepare import prepare_data

            self.data = prepare_data(spec, self.device, progress=False)
            self.make_batches = lambda: self.data.train_batches(self.batch_size)
            self.make_batches().close()  # a split smaller than one batch is a UserError: raise it now
            self.residency = self.data.residency
        else:
            raise UserError(f"--data: {options.data!r} is not one of spec, synthetic")
        torch.manual_seed(tr.seed)
        self.base = build_network(spec.model).to(self.device)
        self.parameters = count_parameters(self.base)
        # The trainer's loss object.
        self.loss = MeanFlowLoss(spec.meanflow, spec.time_sampling, spec.model.prediction_type)
        bound = dict(mf=spec.meanflow, prediction_type=spec.model.prediction_type)
        self.math: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
            "naive": as_compute(naive_imf_loss, **bound),
            "imf": self.loss.compute,
            # the same loss, but the JVP sees the network as a plain callable: no parameter enters it as a dual input
            "imf_const_params": lambda net, *args, **kw: self.loss.compute(lambda *a: net(*a), *args, **kw),
            "fm": as_compute(flow_matching_loss, **bound),
            "predecessor": as_compute(predecessor_imf_loss, **bound, norm_eps=options.predecessor.norm_eps),
        }
        # (t, r) of the predecessor variant: its own r = t fraction when one is given
        proportion = options.predecessor.data_proportion
        self.draw_loss = {
            "predecessor": self.loss
            if proportion is None
            else MeanFlowLoss(
                spec.meanflow,
                spec.time_sampling.model_copy(update={"data_proportion": proportion}),
                spec.model.prediction_type,
            )
        }
        self.flops: dict[str, int] = {}

    def forward_flops_per_latent(self) -> int | None:
        """FLOPs of one forward pass per latent (no grad), counted once on one micro-batch of zeros."""
        if "forward" not in self.flops:
            shape = (self.micro, self.spec.model.in_channels, *self.spec.model.spatial_size)
            x = torch.zeros(shape, device=self.device)
            t = torch.full((self.micro,), 0.5, device=self.device)
            with torch.no_grad():
                self.flops["forward"] = count_flops(lambda: self.base(x, t, t)) // self.micro
        return self.flops["forward"]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _peak(spec: RunSpec, device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override * 1e12, "--peak-tflops"
    return peak_flops(device, spec.training.precision)


def _projection(spec: RunSpec, variant: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """Wall time of the run's training steps at this step time (no validation, samples or checkpoints)."""
    total = spec.training.total_steps(steps_per_epoch)
    per_step = variant["step_s"]["median"] + variant["data_wait_s"]["median"]
    return {
        "variant": variant["name"],
        "steps_per_epoch": steps_per_epoch,
        "max_epochs": spec.training.max_epochs,
        "max_steps": spec.training.max_steps,
        "total_steps": total,
        "seconds_per_step": per_step,
        "run_hours": total * per_step / 3600,
        "formula": "run_hours = (max_steps or max_epochs * steps_per_epoch) * (median step + median data wait) / 3600",
    }


def bench(spec: RunSpec, options: BenchOptions) -> dict[str, Any]:
    """Run the variants; return every number (the JSON `neuromf bench --json` writes)."""
    from neuromf.bench.report import ratios_and_targets

    names = options.variants or default_variants(spec, compare=False)
    check_variant_names(names)
    if options.steps < 1 or options.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    b = BenchSetup(spec, options)
    peak, peak_source = _peak(spec, b.device, options.peak_tflops)
    tr = spec.training
    out: dict[str, Any] = {
        "neuromf_bench": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.name,
        "device": describe_device(b.device),
        "versions": versions(),
        "settings": {
            "batch_size": b.batch_size,
            "micro_batch_size": b.micro,
            "accumulate_grad_batches": tr.accumulate_grad_batches,
            "latent_shape": [spec.model.in_channels, *spec.model.spatial_size],
            "channels": list(spec.model.channels),
            "num_res_blocks": spec.model.num_res_blocks,
            "parameters": b.parameters,
            "precision": tr.precision,
            "gradient_checkpointing": tr.gradient_checkpointing,
            "channels_last": options.channels_last,
            "steps": options.steps,
            "warmup": options.warmup,
            "interleave": options.interleave,
            "data": options.data,
            "profile": options.profile,
            "compile_mode": options.compile_mode or tr.compile_mode,
            "predecessor": dataclasses.asdict(options.predecessor),
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
        main = next(
            (n for n in ("compiled" if tr.compile else "eager", "compiled", "eager") if n in ok), next(iter(ok), None)
        )
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
