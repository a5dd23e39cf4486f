"""`neuromf show SPEC`: the fully resolved run-spec as YAML."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from neuromf.cli import add_spec_arguments

    add_spec_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from neuromf.spec import dump_runspec, load_runspec

    print(dump_runspec(load_runspec(args.spec, args.overrides)), end="")
    return 0
