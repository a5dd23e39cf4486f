"""`neuromf sample CKPT --n N --out DIR`: generate samples from a checkpoint (or a run folder's best/latest).

Writes, per NFE, the de-normalised latents, one decoded NIfTI volume per sample
(through the MAISI VAE when the checkpoint's run-spec has one, identity for the
demo) and a PNG grid of mid slices; see neuromf/evaluation/sampling.py.
"""

from __future__ import annotations

import argparse


def parse_nfe(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; argparse turns the ValueError into a usage error (exit 2)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every NFE must be an integer >= 1, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", metavar="CKPT", help="a checkpoint file, or a run folder (uses best.pt, else latest.pt)"
    )
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument(
        "--nfe",
        type=parse_nfe,
        default=None,
        metavar="1,2,4",
        help="numbers of sampling steps (default: the run-spec's sampling.nfe)",
    )
    parser.add_argument("--weights", choices=["ema", "online"], default="ema", help="EMA (default) or online weights")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; sample i depends only on (seed, i)")
    parser.add_argument("--out", type=str, required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="samples per batch (default: training.micro_batch_size)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--grid-n", type=int, default=16, help="samples shown in each PNG grid (default 16)")
    parser.add_argument("--no-volumes", action="store_true", help="skip the NIfTI volumes (latents and grids only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.atomic import check_output
    from neuromf.device import resolve_device
    from neuromf.errors import UserError
    from neuromf.evaluation.runs import load_for_eval
    from neuromf.evaluation.sampling import write_samples

    if args.n < 1:
        raise UserError(f"--n {args.n}: must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    device = resolve_device(args.device)
    check_output(Path(args.out), "--out", folder=True)
    loaded = load_for_eval(Path(args.checkpoint))
    nfes = args.nfe or loaded.spec.sampling.nfe
    written = write_samples(
        loaded,
        Path(args.out),
        n=args.n,
        nfes=nfes,
        weights=args.weights,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        grid_n=max(1, args.grid_n),
        save_volumes=not args.no_volumes,
        progress=not args.no_progress,
    )
    print(
        f"{loaded.path} (step {loaded.global_step}): {args.n} samples x NFE {list(nfes)} with {args.weights} weights in {args.out}"
    )
    for label, paths in written.items():
        print(
            f"  {label}: {paths['latents'].name}, {paths['grid'].name}"
            + (f", {args.n} NIfTI volumes" if not args.no_volumes else "")
        )
    return 0
