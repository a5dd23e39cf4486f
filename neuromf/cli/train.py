"""`neuromf train SPEC`: train, checkpoint, resume, sample.

Exit codes: 0 done; 2 bad input; 3 stopped after training.max_bad_steps
consecutive NaN/Inf steps; 75 stopped by SIGTERM/SIGUSR1/SIGUSR2 after saving
a checkpoint (the sbatch wrapper requeues; run again with --resume auto);
130 stopped by Ctrl-C after saving.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from neuromf.cli import add_spec_arguments

    add_spec_arguments(parser)
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        default=None,
        help="auto: continue from the newest complete checkpoint in the run folder, or start fresh if there is none; "
        "PATH: continue from that checkpoint",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate, build the model and the data, run one step, stop"
    )
    parser.add_argument(
        "--verify-data",
        action="store_true",
        help="recompute the shard's content checksum even if this run already verified this file",
    )


def run(args: argparse.Namespace) -> int:
    from neuromf.cli.validate import data_problems
    from neuromf.errors import UserError
    from neuromf.spec import load_runspec
    from neuromf.train.loop import train

    spec = load_runspec(args.spec, args.overrides)
    problems = data_problems(spec)
    if problems:
        raise UserError(*problems)
    return train(spec, resume=args.resume, dry_run=args.dry_run, verify_data=args.verify_data)
