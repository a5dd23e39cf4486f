"""The run-spec: schema (typed sections) and loader (YAML, overrides, references, paths)."""

from neuromf.spec.loader import dump_runspec, load_runspec, runspec_from_dict
from neuromf.spec.schema import RunSpec

__all__ = ["RunSpec", "dump_runspec", "load_runspec", "runspec_from_dict"]
