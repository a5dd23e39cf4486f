"""`neuromf verify RUN_DIR`: write verification_report.md/.json and loss_curve.png (the seed's P4-T1..T8).

Exit codes: 0 report written, no critical test failed; 1 report written and a
critical test (P4-T1..T6) FAILED; 2 bad input (not a run folder, an unusable
checkpoint).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (paths.run_dir of the run-spec)")
    parser.add_argument("--n", type=int, default=None,
                        help="samples for P4-T6/T7 (default: the whole test split, at most 500)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-evaluate", action="store_true",
                       help="never generate samples: reuse a matching evaluation/evaluation.json, else P4-T6/T7 say NEEDS-LOOK")
    group.add_argument("--re-evaluate", action="store_true", help="evaluate again even if evaluation/evaluation.json matches")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.errors import UserError
    from neuromf.evaluation.evaluate import resolve_device
    from neuromf.evaluation.report import verify_run

    if args.n is not None and args.n < 2:
        raise UserError(f"--n {args.n}: FD and MMD need at least 2 samples")
    resolve_device(args.device)
    mode = "skip" if args.no_evaluate else "force" if args.re_evaluate else "auto"
    report = verify_run(Path(args.run_dir), n=args.n, evaluation=mode, device=args.device, progress=not args.no_progress)
    width = max(len(t["status"]) for t in report["tests"])
    for t in report["tests"]:
        print(f"{t['id']}  {t['status']:<{width}}  {t['evidence']}")
    print(report["verdict"])
    print(f"wrote {Path(args.run_dir) / 'verification_report.md'} (and .json, loss_curve.png)")
    return 1 if report["critical_failed"] else 0
