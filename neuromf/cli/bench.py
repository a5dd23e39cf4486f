"""`neuromf bench SPEC`: time training steps and report speed, memory, FLOPs, MFU and data wait.

Without --compare it runs the step `neuromf train` would run (compiled when
training.compile). With --compare it runs, on the same network and inputs: the
predecessor's step, the naive reference, our step eager and compiled, and the
flow-matching floor eager and compiled; then prints the ratios and the targets.
GPU levers: --compile-mode (reduce-overhead: CUDA graphs), --channels-last, --checkpointing.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from neuromf.cli import add_spec_arguments

    add_spec_arguments(parser)
    parser.add_argument(
        "--steps", type=int, default=10, metavar="N", help="timed optimizer steps per variant (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        metavar="W",
        help="untimed steps after the first (which includes compilation) (default 2)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, metavar="B", help="latents per optimizer step (default training.batch_size)"
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        metavar="M",
        help="latents per micro-batch; B/M micro-batches accumulate into one step (default: B, or the spec's)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run predecessor, naive, eager, compiled, fm, fm_compiled on the same inputs and print ratios",
    )
    parser.add_argument(
        "--variants",
        default=None,
        metavar="V1,V2",
        help="comma-separated subset of predecessor,naive,eager,compiled,fm,fm_compiled,compiled_nofold (overrides --compare)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the variants one step each in turn (fair comparisons on a busy, shared machine)",
    )
    parser.add_argument(
        "--data",
        choices=["spec", "synthetic"],
        default="spec",
        help="spec: the run-spec's data through the trainer's loader (default); "
        "synthetic: random latents already on the device (no data needed)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="network and batches in channels_last_3d memory format"
    )
    parser.add_argument(
        "--checkpointing",
        choices=["on", "off"],
        default=None,
        help="activation checkpointing of the gradient passes (default: training.gradient_checkpointing)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
        help="torch.compile mode of the compiled variants (default: training.compile_mode); "
        "reduce-overhead: CUDA graphs",
    )
    parser.add_argument(
        "--predecessor-norm-eps",
        type=float,
        default=1.0,
        metavar="E",
        help="norm_eps of the predecessor variant's adaptive weight (default 1.0, its setting)",
    )
    parser.add_argument(
        "--predecessor-data-proportion",
        default="0.5",
        metavar="P",
        help="fraction of the predecessor variant's batch with r = t (default 0.5, its setting; "
        "'spec': time_sampling.data_proportion, the other variants' times)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        metavar="T",
        help="the device's peak TFLOP/s for MFU (default: the built-in A100/H100/H200 table)",
    )
    parser.add_argument(
        "--epoch-latents",
        type=int,
        default=None,
        metavar="N",
        help="training latents per epoch for the run-time projection (default: the train split; synthetic: 1080)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="N",
        help="profile one more step per variant and list its N ops with the most self time (default N 8)",
    )
    parser.add_argument(
        "--json", dest="json_out", default=None, metavar="OUT", help="write every number to this JSON file"
    )


def _batch_overrides(args: argparse.Namespace) -> list[str]:
    """--batch/--micro-batch as run-spec overrides, so the spec's own validation checks them."""
    from neuromf.errors import UserError
    from neuromf.spec import load_runspec

    if args.batch is None and args.micro_batch is None:
        return []
    spec = load_runspec(args.spec, args.overrides)
    batch = args.batch if args.batch is not None else spec.training.batch_size
    micro = (
        args.micro_batch
        if args.micro_batch is not None
        else (batch if args.batch is not None else spec.training.micro_batch_size)
    )
    if batch < 1 or micro < 1 or batch % micro:
        raise UserError(f"--micro-batch: {micro} must be >= 1 and divide --batch {batch}")
    return [f"training.batch_size={batch}", f"training.accumulate_grad_batches={batch // micro}"]


def _predecessor_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from neuromf.bench.predecessor import PredecessorOptions
    from neuromf.errors import UserError

    if not args.predecessor_norm_eps > 0:
        raise UserError(f"--predecessor-norm-eps: {args.predecessor_norm_eps} must be > 0")
    if args.predecessor_data_proportion == "spec":
        return PredecessorOptions(args.predecessor_norm_eps, None)
    try:
        p = float(args.predecessor_data_proportion)
    except ValueError:
        p = -1.0
    if not 0 <= p <= 1:
        raise UserError(
            f"--predecessor-data-proportion: {args.predecessor_data_proportion!r} must be in [0, 1] or 'spec'"
        )
    return PredecessorOptions(args.predecessor_norm_eps, p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.atomic import check_output
    from neuromf.bench import BenchOptions, bench, default_variants, format_table, write_json
    from neuromf.bench.variant import check_variant_names
    from neuromf.errors import UserError
    from neuromf.spec import load_runspec

    if args.profile < 0:
        raise UserError(f"--profile: {args.profile} must be >= 0")
    if args.json_out:
        check_output(Path(args.json_out), "--json")  # before minutes of benchmarking, not after
    levers = [] if args.checkpointing is None else [f"training.gradient_checkpointing={args.checkpointing == 'on'}"]
    spec = load_runspec(args.spec, [*args.overrides, *_batch_overrides(args), *levers])
    predecessor = _predecessor_options(args)
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        check_variant_names(variants)
    else:
        variants = default_variants(spec, args.compare)

    def progress(name: str, res: dict) -> None:
        what = res["error"] or f"median step {res['step_s']['median']:.3f} s"
        print(f"  {name}: {what}", flush=True)

    print(f"benchmarking {', '.join(variants)} ({args.steps} timed steps each)", flush=True)
    options = BenchOptions(
        steps=args.steps,
        warmup=args.warmup,
        variants=variants,
        data=args.data,
        channels_last=args.channels_last,
        interleave=args.interleave,
        peak_tflops=args.peak_tflops,
        epoch_latents=args.epoch_latents,
        profile=args.profile,
        on_variant=progress,
        compile_mode=args.compile_mode,
        predecessor=predecessor,
    )
    out = bench(spec, options)
    print()
    print(format_table(out))
    if args.json_out:
        write_json(Path(args.json_out), out)
        print(f"wrote {args.json_out}")
    failed = [n for n, v in out["variants"].items() if v["error"] and v["error"] != "out of memory"]
    return 1 if failed else 0
