"""`neuromf validate SPEC`: every problem at once, or a short summary of the run."""

from __future__ import annotations

import argparse

from neuromf.atomic import writable_folder
from neuromf.spec.schema import RunSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from neuromf.cli import add_spec_arguments

    add_spec_arguments(parser)
    parser.add_argument(
        "--check-paths", action="store_true", help="also check that inputs exist and outputs are writable"
    )
    parser.add_argument(
        "--check-device",
        action="store_true",
        help="also check that the requested device and precision are usable here, and run `neuromf doctor` "
        "(report: <paths.run_dir>/doctor.json)",
    )


def path_problems(spec: RunSpec) -> list[str]:
    """Inputs that do not exist and outputs that cannot be written."""
    problems = []
    data = spec.data
    shard_present = data.shard is not None and data.shard.is_file()
    if data.source == "folder" or (data.source == "shard" and not shard_present):
        if data.latent_dir is None:
            problems.append(f"data.shard: {data.shard} does not exist and data.latent_dir is not set to pack it from")
        elif not data.latent_dir.is_dir():
            problems.append(f"data.latent_dir: {data.latent_dir} is not a folder")
    if data.stats == "file":
        stats = data.stats_file or (data.latent_dir / "latent_stats.json" if data.latent_dir else None)
        if stats is None or not stats.is_file():
            problems.append(f"data.stats_file: {stats} does not exist (data.stats is 'file')")
    if spec.model.init_from is not None and not spec.model.init_from.is_file():
        problems.append(f"model.init_from: {spec.model.init_from} does not exist")
    if spec.vae.decoder == "maisi":
        if spec.paths.vae_weights is None:
            problems.append("paths.vae_weights: not set; samples need the VAE (or set vae.decoder: identity)")
        elif not spec.paths.vae_weights.is_file():
            problems.append(f"paths.vae_weights: {spec.paths.vae_weights} does not exist")
    if spec.evaluation.weights is not None and not spec.evaluation.weights.is_file():
        problems.append(
            f"evaluation.weights: {spec.evaluation.weights} does not exist (stage the extractor's weights file)"
        )
    for field, folder in [("paths.run_dir", spec.paths.run_dir), ("paths.cache_dir", spec.paths.cache_dir)]:
        if folder is not None and not writable_folder(folder):
            problems.append(f"{field}: {folder} is not writable")
    if data.shard is not None and not shard_present and not writable_folder(data.shard.parent):
        problems.append(f"data.shard: cannot write {data.shard} (folder not writable)")
    return problems + source_problems(spec)


def source_problems(spec: RunSpec) -> list[str]:
    """data.shard must be a NeuroMF shard (or absent, with a data.latent_dir that can be packed or read)."""
    from neuromf.data.shard import read_shard_info
    from neuromf.data.sources import list_source_files
    from neuromf.data.upstream import read_upstream
    from neuromf.errors import UserError

    data, problems = spec.data, []
    if data.source in ("shard", "demo") and data.shard is not None and data.shard.exists():
        try:
            read_shard_info(data.shard)
        except UserError as e:
            if data.latent_dir is None or "incomplete" not in e.problems[0]:
                problems.append(f"data.shard: {e.problems[0]}")
    if data.source != "demo" and data.latent_dir is not None and data.latent_dir.is_dir():
        try:
            for path in list_source_files(data.latent_dir):
                if path.name.endswith(".h5"):
                    read_upstream(path)
        except UserError as e:
            problems.extend(f"data.latent_dir: {line}" for line in e.problems)
    return problems


def split_of(spec: RunSpec):  # -> Optional[Split]
    """The subject-level split the run would train on, when the data can be read without packing; else None."""
    from neuromf.data.prepare import default_shard_path
    from neuromf.data.scan import folder_metas
    from neuromf.data.shard import read_shard_info
    from neuromf.data.split import split_subjects
    from neuromf.errors import UserError

    d = spec.data
    try:
        shard = default_shard_path(spec)
        if d.source in ("shard", "demo") and shard.is_file() and (d.latent_dir is None or d.source == "demo"):
            metas = read_shard_info(shard).metas
        elif d.source != "demo" and d.latent_dir is not None and d.latent_dir.is_dir():
            metas = folder_metas(d.latent_dir, read_pt=d.subject_from == "metadata")
        else:
            return None
    except UserError:
        return None  # reported by path_problems
    return split_subjects(metas, d.val_fraction, d.test_fraction, d.split_seed, d.subject_from)


def device_problems(spec: RunSpec) -> list[str]:
    """The requested device and precision must exist here (run this on the compute node)."""
    import torch

    problems = []
    if spec.hardware.device == "cuda" and not torch.cuda.is_available():
        problems.append("hardware.device: 'cuda' requested but no CUDA GPU is visible")
    on_cuda = spec.hardware.device in {"cuda", "auto"} and torch.cuda.is_available()
    if on_cuda and spec.training.precision == "bf16" and not torch.cuda.is_bf16_supported():
        problems.append("training.precision: this GPU has no bf16 support; use fp32 (never fp16)")
    if on_cuda and spec.hardware.gpus_per_node > torch.cuda.device_count():
        problems.append(
            f"hardware.gpus_per_node: {spec.hardware.gpus_per_node} requested, {torch.cuda.device_count()} visible"
        )
    return problems


def count_latents(spec: RunSpec) -> int | None:
    """How many latents the run will see, when that can be known without reading them all."""
    data = spec.data
    if data.source == "demo":
        return data.demo.n_volumes
    if data.source == "shard" and data.shard is not None and data.shard.is_file():
        import h5py

        try:
            with h5py.File(data.shard, "r", locking=False) as f:
                return int(f["latents"].shape[0])
        except (OSError, KeyError):
            return None
    if data.latent_dir is not None and data.latent_dir.is_dir():
        from neuromf.data.scan import folder_metas
        from neuromf.errors import UserError

        try:
            return len(folder_metas(data.latent_dir, read_pt=False))
        except UserError:
            return None
    return None


def count_parameters(spec: RunSpec) -> int:
    """Parameters of the network, built on the meta device (no memory, no init time)."""
    import torch

    from neuromf.model.unet import build_network

    with torch.device("meta"):
        net = build_network(spec.model)
    return sum(p.numel() for p in net.parameters())


def summary_lines(spec: RunSpec, split=None) -> list[str]:  # split: Optional[Split]
    from neuromf.data.split import estimate_sizes

    t = spec.training
    lines = [f"run-spec OK: {spec.name}"]
    try:
        lines.append(
            f"  model:          {count_parameters(spec) / 1e6:.2f} M parameters, prediction {spec.model.prediction_type}"
        )
    except ImportError:
        pass
    gpus = spec.hardware.nodes * spec.hardware.gpus_per_node
    per_gpu = t.batch_size // (gpus * t.accumulate_grad_batches)
    lines.append(
        f"  batch:          {t.batch_size} latents per optimizer step = "
        + (f"{gpus} GPUs x " if gpus > 1 else "")
        + f"{t.accumulate_grad_batches} accumulated x micro-batch {per_gpu}"
    )
    n = count_latents(spec)
    if split is not None:
        n_train = len(split.train)
        lines.append(
            f"  data:           {len(split.subject_of)} latents, {len(set(split.subject_of.values()))} subjects, "
            f"split by subject (data.split_seed {spec.data.split_seed}):"
        )
        lines.extend(f"    {line}" for line in split.summary_lines())
    elif n is not None:
        n_train, n_val, n_test = estimate_sizes(n, spec.data.val_fraction, spec.data.test_fraction)
        lines.append(
            f"  data:           {n} latents -> about {n_train} train / {n_val} val / {n_test} test "
            "(split by subject; --check-paths shows the split)"
        )
    if split is not None or n is not None:
        steps = n_train // t.batch_size
        total = t.max_steps or steps * t.max_epochs
        lines.append(f"  schedule:       {steps} steps per epoch, {total} optimizer steps in all")
    lines.append(
        f"  precision:      {t.precision}, compile {'on' if t.compile else 'off'}, device {spec.hardware.device}"
    )
    lines.append(f"  run folder:     {spec.paths.run_dir}")
    lines.append(f"  checkpoints:    {spec.paths.run_dir / 'checkpoints'}")
    lines.append(f"  samples:        {spec.paths.run_dir / 'samples'}")
    return lines


def data_problems(spec: RunSpec, split=None) -> list[str]:  # split: Optional[Split]
    """Checks that need the data's size: an epoch must hold at least one step, warmup must fit."""
    from neuromf.data.split import estimate_sizes

    n = count_latents(spec) if split is None else len(split.subject_of)
    if n is None:
        return []
    t = spec.training
    n_train = (
        len(split.train) if split is not None else estimate_sizes(n, spec.data.val_fraction, spec.data.test_fraction)[0]
    )
    if n_train < t.batch_size:
        return [f"training.batch_size: {t.batch_size} is larger than the training split ({n_train} of {n} latents)"]
    total = t.max_steps or (n_train // t.batch_size) * t.max_epochs
    if t.warmup_steps >= total:
        return [f"training.warmup_steps: {t.warmup_steps} is not shorter than the whole run ({total} steps)"]
    return []


def run(args: argparse.Namespace) -> int:
    from neuromf.errors import UserError
    from neuromf.spec import load_runspec

    spec = load_runspec(args.spec, args.overrides)
    split = split_of(spec) if args.check_paths else None
    problems = data_problems(spec, split)
    if args.check_paths:
        problems += path_problems(spec)
    if args.check_device:
        problems += device_problems(spec)
    if problems:
        raise UserError(*problems)
    if args.check_device:  # the device exists: now what it computes, compiles, fits and how fast
        from neuromf.cli.doctor import doctor_lines

        report = spec.paths.run_dir / "doctor.json"
        ok, failed = doctor_lines(spec, report if writable_folder(spec.paths.run_dir) else None)
        if not ok:
            raise UserError(*failed)
    print("\n".join(summary_lines(spec, split)))
    return 0
