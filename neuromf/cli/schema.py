"""`neuromf schema`: the run-spec's JSON Schema, for editors' completion and checking."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from neuromf.spec import RunSpec

    print(json.dumps(RunSpec.model_json_schema(), indent=2))
    return 0
