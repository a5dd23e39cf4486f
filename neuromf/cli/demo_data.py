"""`neuromf demo-data OUT_DIR`: write the embedded demo dataset (MNI152-based 4-channel latents)."""

from __future__ import annotations

import argparse

# Cube side when the run-spec's default leaves it to follow model.spatial_size.
DEFAULT_SIZE = 32


def _defaults() -> tuple[int, int, int]:
    """(n_volumes, size, seed) defaults, taken from the run-spec's DemoDataSpec."""
    from neuromf.spec.schema import DemoDataSpec  # pydantic only: keeps `neuromf --help` fast

    fields = DemoDataSpec.model_fields
    size = fields["size"].default
    # The spec leaves size unset to follow model.spatial_size; standing alone, use the demo's own default.
    size = size if size is not None else DEFAULT_SIZE
    return int(fields["n_volumes"].default), int(size), int(fields["seed"].default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    n, size, seed = _defaults()
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="folder to write (created; an old demo set there is replaced)"
    )
    parser.add_argument("--n", type=int, default=n, metavar="N", help=f"number of volumes (default {n})")
    parser.add_argument("--size", type=int, default=size, metavar="S", help=f"cube side in voxels (default {size})")
    parser.add_argument("--seed", type=int, default=seed, metavar="SEED", help=f"random seed (default {seed})")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from neuromf.data.demo import STATS_NAME, build_demo_dataset
    from neuromf.errors import UserError

    problems = []
    if args.n < 1:
        problems.append(f"--n: must be >= 1, got {args.n}")
    if args.size < 8:
        problems.append(f"--size: must be >= 8, got {args.size}")
    if problems:
        raise UserError(*problems)

    start = time.perf_counter()
    out = build_demo_dataset(Path(args.out_dir), args.n, args.size, args.seed)
    seconds = time.perf_counter() - start
    s = args.size
    print(f"wrote {args.n} demo volumes (4, {s}, {s}, {s}) float32, seed {args.seed}, to {out} in {seconds:.1f} s")
    print(f"  files: demo_0000.pt .. demo_{args.n - 1:04d}.pt, {STATS_NAME}")
    print("  channels: 0 T1, 1 grey matter, 2 white matter, 3 CSF (MNI152 template shipped with nilearn)")
    return 0
