"""`neuromf verify RUN_DIR`: write verification_report.md/.json and loss_curve.png (the verification tests P4-T1..P4-T8 of docs/design.md, 'Verification tests').

P4-T6 uses the strongest feature space the run-spec's `evaluation` section
configures (an image-space FID with a published extractor when its weights
file is there), else the pooled FD, labelled as not comparable with papers.

Exit codes: 0 report written, no critical test failed; 1 report written and a
critical test (P4-T1..T6) FAILED; 2 bad input (not a run folder, an unusable
checkpoint).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (paths.run_dir of the run-spec)")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples for the sample-based tests P4-T6 (EMA beats online) and P4-T7 (statistics) (default: evaluation.n, else the whole held-out split, at most 500)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--no-evaluate",
        action="store_true",
        help="never generate samples: reuse a matching evaluation/evaluation.json, else the sample-based tests P4-T6/P4-T7 say NEEDS-LOOK",
    )
    group.add_argument(
        "--re-evaluate", action="store_true", help="evaluate again even if evaluation/evaluation.json matches"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.atomic import check_output
    from neuromf.device import resolve_device
    from neuromf.errors import UserError
    from neuromf.evaluation.report import verify_run

    if args.n is not None and args.n < 2:
        raise UserError(f"--n {args.n}: FD and MMD need at least 2 samples")
    resolve_device(args.device)
    run_dir = Path(args.run_dir)
    if run_dir.is_dir():  # (not a run folder at all: verify_run says so)
        # The report goes into the run folder, a new evaluation into evaluation/: check before any work.
        check_output(run_dir / "verification_report.md", "RUN_DIR")
        if not args.no_evaluate:
            check_output(run_dir / "evaluation", "RUN_DIR", folder=True)
    mode = "skip" if args.no_evaluate else "force" if args.re_evaluate else "auto"
    report = verify_run(
        Path(args.run_dir), n=args.n, evaluation=mode, device=args.device, progress=not args.no_progress
    )
    width = max(len(t["status"]) for t in report["tests"])
    for t in report["tests"]:
        print(f"{t['id']}  {t['status']:<{width}}  {t['evidence']}")
    t6 = next((t for t in report["tests"] if t["id"] == "P4-T6"), {}).get("details", {})
    if t6.get("fd_used"):
        print(f"P4-T6 used {t6['fd_used']}")
    print(report["verdict"])
    print(f"wrote {Path(args.run_dir) / 'verification_report.md'} (and .json, loss_curve.png)")
    return 1 if report["critical_failed"] else 0
