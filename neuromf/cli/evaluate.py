"""`neuromf evaluate RUN_DIR|CKPT`: EMA vs online samples against held-out data (FID, MMD, MS-SSIM, statistics).

Writes <run>/evaluation/evaluation.json and latent_histograms.png (or --out
DIR), prints a table, and with --json OUT also writes the JSON to OUT. See
neuromf/evaluation/evaluate.py for what each number means.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from neuromf.cli.sample import parse_nfe

    parser.add_argument(
        "target", metavar="RUN_DIR|CKPT", help="a run folder (uses best.pt, else latest.pt) or a checkpoint file"
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples per weights and NFE, and reference volumes (default: evaluation.n, else the whole held-out split, at most 500)",
    )
    parser.add_argument(
        "--nfe", type=parse_nfe, default=None, metavar="1,2,4", help="default: the run-spec's sampling.nfe"
    )
    parser.add_argument(
        "--reference",
        choices=["auto", "test", "val", "train"],
        default="auto",
        help="auto (default): the test split when the data has one, else validation; or train (more of them)",
    )
    parser.add_argument(
        "--features",
        choices=["pooled", "medicalnet3d", "radimagenet2p5d"],
        default=None,
        help="feature space (default: the run-spec's evaluation.features, else pooled): pooled statistics "
        "(weight-free, not comparable with papers), MedicalNet 3D FID, or MAISI's RadImageNet 2.5D FID",
    )
    parser.add_argument(
        "--weights", default=None, metavar="PATH", help="the extractor's weights file (default: evaluation.weights)"
    )
    parser.add_argument(
        "--space",
        choices=["image", "latent"],
        default=None,
        help="image: decode through the run-spec's VAE first; latent: compare latents (pooled only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (the same noise for EMA and online)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results JSON here")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for evaluation.json and the histogram PNG (default: <run_dir>/evaluation)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: training.micro_batch_size")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.atomic import atomic_write_text, check_output
    from neuromf.device import resolve_device
    from neuromf.errors import UserError
    from neuromf.evaluation.evaluate import EvalOptions, evaluate_checkpoint, format_summary
    from neuromf.evaluation.jsonio import to_json
    from neuromf.evaluation.runs import load_for_eval

    if args.n is not None and args.n < 2:
        raise UserError(f"--n {args.n}: FD and MMD need at least 2 samples")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    resolve_device(args.device)
    if args.json_out:
        check_output(Path(args.json_out), "--json")  # before the evaluation, not after
    if args.out:
        check_output(Path(args.out), "--out", folder=True)
    loaded = load_for_eval(Path(args.target))
    spec_eval = loaded.spec.evaluation
    features = args.features or spec_eval.features
    weights = Path(args.weights) if args.weights else (spec_eval.weights if features == spec_eval.features else None)
    space = args.space or (spec_eval.space if features == spec_eval.features else None)
    options = EvalOptions.from_spec(
        loaded.spec,
        n=args.n,
        nfe=args.nfe,
        seed=args.seed,
        reference=args.reference,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        extractor=features,
        weights_file=weights,
        space=space or ("latent" if features == "pooled" else "image"),
    )
    out_dir = Path(args.out) if args.out else loaded.run_dir / "evaluation"
    # a read-only run folder: now, not after the work
    check_output(out_dir, "--out" if args.out else "RUN_DIR", folder=True)
    summary = evaluate_checkpoint(loaded, options, out_dir)
    if args.json_out:
        atomic_write_text(Path(args.json_out), to_json(summary))
    print(format_summary(summary))
    print(
        f"wrote {out_dir / 'evaluation.json'} and {out_dir / summary['files']['histograms']}"
        + (f" and {args.json_out}" if args.json_out else "")
    )
    from neuromf.evaluation.wandb_summary import send_to_wandb

    sent = send_to_wandb(loaded.spec, loaded.run_dir, summary)
    if sent:
        print(sent)
    if summary["extractor"]["weights"]:
        print(
            f"extractor weights {summary['extractor']['weights']} (sha256 {summary['extractor']['weights_sha256'][:16]}...)"
        )
    return 0
