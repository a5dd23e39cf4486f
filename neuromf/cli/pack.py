"""`neuromf pack SPEC` or `neuromf pack SRC_DIR OUT.h5`: pack `.pt` latents and/or upstream per-dataset `.h5`
shards (their written slots) into one HDF5 shard, with per-latent metadata."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SPEC|SRC_DIR",
        help="a run-spec (.yaml/.yml: packs data.latent_dir into data.shard) or a folder of .pt latents and/or the "
        "upstream encoder's per-dataset .h5 shards",
    )
    parser.add_argument("out", metavar="OUT.h5", nargs="?", help="the shard to write (with SRC_DIR)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-spec field (with SPEC), e.g. --set data.latent_dir=/data/latents",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="storage dtype (float32: exact; float16 / bfloat16 halve the size, see docs/benchmarks.md)",
    )
    parser.add_argument("--skip-bad", action="store_true", help="pack the good files and list the bad ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _is_spec(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromf.data.pack import format_skipped, pack_latents
    from neuromf.errors import UserError

    if _is_spec(args.source):
        if args.out is not None:
            raise UserError(f"{args.out}: with a run-spec the shard is data.shard; give either SPEC or SRC_DIR OUT.h5")
        from neuromf.data.prepare import default_shard_path, latent_source_dir
        from neuromf.spec import load_runspec

        spec = load_runspec(args.source, args.overrides)
        src, out = latent_source_dir(spec), default_shard_path(spec)
        scale, stats_file = spec.vae.scale_factor, spec.data.stats_file
    else:
        if args.out is None:
            raise UserError(f"{args.source}: give the shard to write too (neuromf pack SRC_DIR OUT.h5), or a run-spec")
        if args.overrides:
            raise UserError("--set: only with a run-spec (SPEC)")
        from neuromf.spec.schema import MAISI_SCALE_FACTOR

        src, out, scale, stats_file = Path(args.source), Path(args.out), MAISI_SCALE_FACTOR, None

    report = pack_latents(
        src,
        out,
        dtype=args.dtype,
        skip_bad=args.skip_bad,
        scale_factor=scale,
        stats_file=stats_file,
        progress=not args.no_progress,
    )
    info = report.info
    if report.skipped:
        print(f"skipped {len(report.skipped)} of {info.source_count} files:")
        print(format_skipped(report.skipped))
    print(
        f"packed {info.n} latents of shape {list(info.shape)} ({info.dtype}) from {src} into {out}: "
        f"{report.nbytes / 2**20:.1f} MiB in {report.seconds:.1f} s"
    )
    print("channel mean: " + ", ".join(f"{v:.4g}" for v in info.mean))
    print("channel std:  " + ", ".join(f"{v:.4g}" for v in info.std))
    datasets = {m.dataset for m in info.metas}
    subjects = {(m.dataset, m.subject) for m in info.metas if m.subject}
    print(
        f"metadata: {len(subjects)} subjects in {len(datasets)} dataset(s)"
        + (
            f"; {info.n - sum(1 for m in info.metas if m.subject)} latents without a subject id"
            if len(subjects) and any(not m.subject for m in info.metas)
            else ""
        )
    )
    print(f"content sha256: {info.content_sha256}")
    return 0
