"""Benchmark of the latent data path: pack throughput, batch delivery (memory vs streaming), precision of 16-bit shards.

    python -m neuromf.bench.data_path [--n 256] [--size 48] [--batch-size 24] [--steps 60] [--device cpu]

Writes synthetic latents (4, size^3, float32, per-channel offsets and scales) to a
scratch folder, packs them, and times `TrainBatches.next_batch()` for each
residency. Files were just written, so reads come from the page cache: the pack
numbers are the CPU cost (read, hash, check, statistics, write), not a cold disk
or Lustre. `bench_data()` returns the numbers for `neuromf bench`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from neuromf.data.pack import pack_latents
from neuromf.data.prepare import prepare_data
from neuromf.data.shard import ShardReader, read_shard, read_shard_info
from neuromf.spec import runspec_from_dict


def write_synthetic(folder: Path, n: int, size: int, seed: int = 0) -> int:
    """n float32 latents (4, size, size, size) like a VAE's: per-channel mean/std, smooth-ish; returns bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.3, -0.2, 0.1, 0.5]).view(4, 1, 1, 1)
    std = torch.tensor([1.0, 0.8, 1.2, 0.9]).view(4, 1, 1, 1)
    total = 0
    for i in range(n):
        x = torch.randn(4, size, size, size, generator=g) * std + mean
        torch.save(x, folder / f"sub-{i:05d}.pt")
        total += x.numel() * 4
    return total


def precision_cost(folder: Path, workdir: Path) -> dict[str, dict[str, float]]:
    """Error of float16 / bfloat16 shards against float32, in units of each channel's std (what the model sees)."""
    ref = pack_latents(folder, workdir / "ref.h5", progress=False)
    x32, _ = read_shard(workdir / "ref.h5")
    std = torch.as_tensor(ref.info.std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    out = {}
    for dtype in ("float16", "bfloat16"):
        rep = pack_latents(folder, workdir / f"{dtype}.h5", dtype=dtype, progress=False)
        x16, _ = read_shard(workdir / f"{dtype}.h5")
        err = (x16.double() - x32.double()) / std
        rel = (x16.double() - x32.double()).abs() / x32.double().abs().clamp_min(1e-6)
        out[dtype] = {
            "max_abs_err_std": float(err.abs().max()),
            "rms_err_std": float(err.pow(2).mean().sqrt()),
            "max_rel_err": float(rel.max()),
            "size_ratio": rep.nbytes / ref.nbytes,
        }
        (workdir / f"{dtype}.h5").unlink()
    (workdir / "ref.h5").unlink()
    return out


def _time_batches(
    spec_raw: dict[str, Any], base: Path, device: torch.device, batch_size: int, steps: int
) -> dict[str, float]:
    start = time.perf_counter()
    data = prepare_data(runspec_from_dict(spec_raw, base), device, progress=False)
    prepare_s = time.perf_counter() - start
    batches = data.train_batches(batch_size)
    batches.next_batch()  # warm: first read, prefetch thread start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        x = batches.next_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    batches.close()
    data.close()
    return {
        "prepare_s": prepare_s,
        "ms_per_batch": 1000 * seconds / steps,
        "latents_per_s": steps * batch_size / seconds,
        "MB_per_s": steps * x.numel() * 4 / seconds / 1e6,
    }


def _time_fetch(shard: Path, batch_size: int, steps: int) -> dict[str, float]:
    """Raw cost of gathering a batch, without normalising: from a tensor in RAM vs chunk reads from the shard."""
    info = read_shard_info(shard)
    reader = ShardReader(info)
    whole, _ = read_shard(shard)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(info.n, generator=g)[:batch_size] for _ in range(steps)]
    out = {}
    for name, fetch in (("memory", lambda idx: whole[idx]), ("shard", lambda idx: reader.read(idx.tolist()))):
        fetch(batches[0])
        start = time.perf_counter()
        for idx in batches:
            fetch(idx)
        out[f"{name}_ms"] = 1000 * (time.perf_counter() - start) / steps
    reader.close()
    return out


def bench_data(
    workdir: Path | None = None,
    n: int = 256,
    size: int = 48,
    batch_size: int = 24,
    steps: int = 60,
    device: str = "cpu",
    demo_size: int = 32,
    demo_volumes: int = 32,
) -> dict[str, Any]:
    """Run every measurement; returns a nested dict of numbers (and the versions used)."""
    tmp = tempfile.TemporaryDirectory(prefix="neuromf-bench-") if workdir is None else None
    work = Path(tmp.name) if tmp else Path(workdir)
    dev = torch.device(device)
    results: dict[str, Any] = {
        "n": n,
        "size": size,
        "batch_size": batch_size,
        "steps": steps,
        "device": str(dev),
        "versions": {
            "torch": torch.__version__,
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "threads": torch.get_num_threads(),
    }
    src = work / "lat"
    start = time.perf_counter()
    nbytes = write_synthetic(src, n, size)
    results["write_pt_s"] = time.perf_counter() - start
    for dtype in ("float32", "bfloat16"):
        rep = pack_latents(src, work / f"pack-{dtype}.h5", dtype=dtype, progress=False)
        results[f"pack_{dtype}"] = {
            "seconds": rep.seconds,
            "latents_per_s": n / rep.seconds,
            "source_MB_per_s": nbytes / rep.seconds / 1e6,
            "shard_MB": rep.nbytes / 1e6,
        }
        if dtype != "float32":
            (work / f"pack-{dtype}.h5").unlink()
    results["fetch"] = _time_fetch(work / "pack-float32.h5", batch_size, steps)
    raw = {
        "model": {"spatial_size": [size] * 3},
        "paths": {"run_dir": str(work / "run")},
        "data": {"source": "shard", "latent_dir": str(src), "shard": str(work / "pack-float32.h5")},
    }
    residencies = ["device", "host", "stream"] if dev.type == "cuda" else ["host", "stream"]
    for residency in residencies:
        raw["data"]["residency"] = residency
        results[f"batches_{residency}"] = _time_batches(raw, work, dev, batch_size, steps)
    raw["data"].update(residency="host", flip_lr=True)
    results["batches_host_flip"] = _time_batches(raw, work, dev, batch_size, steps)
    raw["data"].update(source="folder", residency="stream", flip_lr=False)
    results["batches_folder_stream"] = _time_batches(raw, work, dev, batch_size, steps)

    results["precision_synthetic"] = precision_cost(src, work)
    try:  # the demo set: MNI152-based, non-Gaussian, many exact zeros outside the brain
        from neuromf.data.demo import build_demo_dataset

        demo = build_demo_dataset(work / "demo", demo_volumes, demo_size, 0)
        results["precision_demo"] = precision_cost(demo, work)
    except ImportError:
        pass
    if tmp:
        tmp.cleanup()
    return results


def format_markdown(r: dict[str, Any]) -> str:
    """The numbers as the table rows docs/benchmarks.md shows."""
    mb = 4 * r["size"] ** 3 * 4 / 1e6
    lines = [
        f"Latents: {r['n']} x (4, {r['size']}^3) float32 ({mb:.2f} MB each), batch {r['batch_size']}, "
        f"{r['steps']} timed batches, device {r['device']}, {r['threads']} torch threads.",
        "",
        "| what | time | throughput |",
        "| --- | --- | --- |",
    ]
    for dtype in ("float32", "bfloat16"):
        p = r[f"pack_{dtype}"]
        lines.append(
            f"| pack --dtype {dtype} ({p['shard_MB']:.0f} MB shard) | {p['seconds']:.2f} s | "
            f"{p['latents_per_s']:.0f} latents/s, {p['source_MB_per_s']:.0f} MB/s of sources |"
        )
    f = r["fetch"]
    lines.append(
        f"| gather a batch from a tensor in RAM (no normalise) | {f['memory_ms']:.1f} ms | "
        f"{r['batch_size'] * 1000 / f['memory_ms']:.0f} latents/s |"
    )
    lines.append(
        f"| read a batch's {r['batch_size']} chunks from the shard (no normalise, no prefetch) | "
        f"{f['shard_ms']:.1f} ms | {r['batch_size'] * 1000 / f['shard_ms']:.0f} latents/s |"
    )
    for key in ("device", "host", "host_flip", "stream", "folder_stream"):
        if f"batches_{key}" in r:
            b = r[f"batches_{key}"]
            lines.append(
                f"| next_batch, residency {key} (prepare {b['prepare_s']:.2f} s) | {b['ms_per_batch']:.1f} ms | "
                f"{b['latents_per_s']:.0f} latents/s, {b['MB_per_s']:.0f} MB/s |"
            )
    for key in ("precision_synthetic", "precision_demo"):
        if key in r:
            lines += [
                "",
                f"{key.replace('_', ' ')}: error against float32, in units of the channel's std",
                "",
                "| dtype | max abs err / std | RMS err / std | max relative err | size vs float32 |",
                "| --- | --- | --- | --- | --- |",
            ]
            for dtype, e in r[key].items():
                lines.append(
                    f"| {dtype} | {e['max_abs_err_std']:.2e} | {e['rms_err_std']:.2e} | "
                    f"{e['max_rel_err']:.2e} | {e['size_ratio']:.2f} |"
                )
    v = r["versions"]
    lines += [
        "",
        f"Versions: torch {v['torch']}, h5py {v['h5py']} (HDF5 {v['hdf5']}), numpy {v['numpy']}, Python {v['python']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    r = bench_data(args.workdir, args.n, args.size, args.batch_size, args.steps, args.device)
    print(format_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
