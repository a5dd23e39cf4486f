"""What the SLURM launcher and worker need to know of a run-spec, printed for a shell script.

    python -m neuromf.spec.launch_info SPEC [--set KEY=VALUE ...]

container/train.sh (on the login node) and container/train_worker.sh (in the job) run this
with the image's own neuromf, so the paths mean what the trainer will make of them. Every
line is `neuromf-KEY: VALUE` (a container runtime may print its own warnings around them):

    run_dir, results_root, cache_dir, shard_dir  the folders the run writes (created by the scripts)
    nodes, gpus_per_node                         hardware.*
    bind                                         (repeated) an existing folder the run reads

An invalid run-spec prints one `field: problem` line each on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuromf.errors import UserError
from neuromf.spec.loader import load_runspec
from neuromf.spec.schema import RunSpec


def launch_info(spec: RunSpec, spec_path: Path) -> list[tuple[str, str]]:
    """(key, value) pairs: see the module docstring."""
    run_dir = spec.paths.run_dir
    shard = spec.data.shard or run_dir / "data" / "latents.h5"
    info = [
        ("run_dir", run_dir),
        ("results_root", spec.paths.results_root or run_dir.parent),
        ("cache_dir", spec.paths.cache_dir or run_dir / "cache" / "torchinductor"),
        ("shard_dir", shard.parent),
        ("nodes", spec.hardware.nodes),
        ("gpus_per_node", spec.hardware.gpus_per_node),
    ]
    reads: list[Path | None] = [
        spec_path.resolve().parent,
        spec.data.latent_dir,
        spec.data.shard and spec.data.shard.parent,
        spec.data.stats_file and spec.data.stats_file.parent,
        spec.paths.vae_weights and spec.paths.vae_weights.parent,
        spec.model.init_from and spec.model.init_from.parent,
    ]
    info += [("bind", folder) for folder in reads if folder is not None and folder.is_dir()]
    return [(key, str(value)) for key, value in info]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuromf.spec.launch_info", description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        spec = load_runspec(args.spec, args.overrides)
    except UserError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    for key, value in launch_info(spec, args.spec):
        print(f"neuromf-{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
