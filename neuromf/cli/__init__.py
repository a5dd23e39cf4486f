"""`neuromf VERB ...`: one module per verb under neuromf/cli/, each with `add_arguments` and `run`.

Verb modules import torch and friends inside `run`, so `neuromf --help` and
`neuromf validate` stay fast. A `UserError` anywhere becomes one line per
problem on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from neuromf import __version__
from neuromf.errors import UserError

# verb -> (module, one-line help). Order is the order of `neuromf --help`.
VERBS: dict[str, tuple[str, str]] = {
    "validate": ("neuromf.cli.validate", "check a run-spec and print a summary"),
    "show": ("neuromf.cli.show", "print the fully resolved run-spec as YAML"),
    "schema": ("neuromf.cli.schema", "print the JSON Schema of the run-spec"),
    "demo-data": ("neuromf.cli.demo_data", "write the embedded demo dataset (MNI152-based latents)"),
    "pack": ("neuromf.cli.pack", "pack a folder of .pt latents and upstream .h5 shards into one HDF5 shard"),
    "train": ("neuromf.cli.train", "train a model from a run-spec (checkpoint/resume, samples)"),
    "sample": ("neuromf.cli.sample", "generate samples from a checkpoint"),
    "evaluate": ("neuromf.cli.evaluate", "compare generated samples with held-out latents"),
    "verify": (
        "neuromf.cli.verify",
        "check a run: the eight verification tests P4-T1..P4-T8 of docs/design.md, as a report",
    ),
    "bench": ("neuromf.cli.bench", "time and measure training steps (speed, memory, FLOPs, MFU)"),
    "doctor": ("neuromf.cli.doctor", "check that this machine can run a run-spec (numerics, compile, memory, speed)"),
}


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """SPEC and --set, shared by every verb that reads a run-spec."""
    parser.add_argument("spec", metavar="SPEC", help="run-spec YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set training.lr=2e-4 --set model.channels=[8,16,32,64] (YAML values)",
    )


def version_text() -> str:
    """`neuromf X.Y.Z`, then, in the image, the exact package versions it was built with (NEUROMF_PIP_FREEZE)."""
    text = f"neuromf {__version__}"
    freeze = os.environ.get("NEUROMF_PIP_FREEZE")
    if freeze:
        try:
            packages = open(freeze, encoding="utf-8").read().strip()
        except OSError as e:
            return f"{text}\npackages: cannot read {freeze}: {e.strerror}"
        text += f"\npackages (pip freeze when the image was built, {freeze}):\n{packages}"
    return text


class _VersionAction(argparse.Action):
    """Like argparse's "version" action, without re-wrapping the lines of the package list."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="print the version (in the image: with the packages it was built with) and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuromf", description="Train one-step latent MeanFlow (iMF) models of 3D brain MRI."
    )
    parser.add_argument("--version", action=_VersionAction)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module_name, help_text) in VERBS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # verb not built yet
        sub = verbs.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        for problem in e.problems:
            print(problem if ": " in problem else f"error: {problem}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
