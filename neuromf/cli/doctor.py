"""`neuromf doctor SPEC`: check that this machine can run the run-spec (numerics, compile, memory, speed, data).

One line per check (PASS / FAIL / SKIP), then a JSON report (default <paths.run_dir>/doctor.json).
Exit 0 when nothing failed, 1 when a check failed, 2 for bad input.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from neuromf.cli import add_spec_arguments

    add_spec_arguments(parser)
    parser.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the report here (default: <paths.run_dir>/doctor.json)",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="C1,C2",
        help="run only these checks: device, toolchain, conv3d_bf16, forward_bf16, jvp, memory, "
        "compiled_step, throughput, data_residency",
    )


def doctor_lines(spec, json_out, only=None) -> tuple[bool, list[str]]:  # type: ignore[no-untyped-def]
    """Run the doctor, print each line as it comes, write the report (unless `json_out` is None);
    return (no FAIL, the FAIL lines)."""
    from neuromf.doctor import report_header, run_doctor, write_report

    header = report_header(spec)
    results = run_doctor(spec, only, on_result=lambda r: print(r.line(), flush=True))
    if json_out is not None:
        write_report(json_out, header, results)
    failed = [r.line() for r in results if r.ok is False]
    return not failed, failed


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.atomic import check_output
    from neuromf.doctor import CHECK_NAMES
    from neuromf.errors import UserError
    from neuromf.spec import load_runspec

    spec = load_runspec(args.spec, args.overrides)
    only = None
    if args.only:
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in only if c not in CHECK_NAMES]
        if unknown:
            raise UserError(f"--only: unknown check {', '.join(unknown)}; choose from {', '.join(CHECK_NAMES)}")
    out = Path(args.json_out) if args.json_out else spec.paths.run_dir / "doctor.json"
    check_output(out, "--json")  # before the checks, not after
    ok, failed = doctor_lines(spec, out, only)
    print(f"{'all checks passed' if ok else f'{len(failed)} check(s) FAILED'}; report: {out}")
    return 0 if ok else 1
