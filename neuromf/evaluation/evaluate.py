"""`neuromf evaluate`: generated samples of the EMA and online weights against held-out latents.

For each weights (ema, online) and each NFE, N samples are generated from the
same per-sample noise and compared with N reference latents (the test split
by default: validation picks best.pt, so it is not held out from selection) in
the pooled-statistics feature space (features.py): Fréchet distance and RBF-kernel MMD^2 at three bandwidths (0.5, 1 and 2 times
the median distance between reference features). Beside them: per-channel
mean, std, skewness and kurtosis of the de-normalised samples against
training latents (P4-T7) with a histogram PNG, and the mean pairwise distance
of the samples against that of real latents (mode collapse shows as a ratio
well below 1). "reference_floor" is the same FD/MMD between N training and N
held-out (test or validation) latents: what a perfect model would score at this N.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch

from neuromf.errors import UserError
from neuromf.evaluation.features import DEFAULT_FEATURES, FeatureSpec, latent_features
from neuromf.evaluation.metrics import (
    MomentAccumulator,
    frechet_distance,
    histogram_overlap,
    mean_pairwise_distance,
    median_pairwise_distance,
    mmd2_rbf,
)
from neuromf.evaluation.runs import LoadedCheckpoint

__all__ = ["EvalOptions", "evaluate_checkpoint", "resolve_device", "format_summary", "DEFAULT_MAX_N"]

DEFAULT_MAX_N = 500  # the seed's P4-T6 sample count; the default N is min(reference size, this)
BANDWIDTH_FACTORS = (0.5, 1.0, 2.0)
DIVERSITY_N = 100  # pairs of up to 100 samples: 4,950 distances, plenty for a mean
HIST_BINS, HIST_SIGMAS = 80, 6.0  # histogram range: stats mean +- 6 std per channel
WEIGHTS: tuple[Literal["ema", "online"], ...] = ("ema", "online")


@dataclass
class EvalOptions:
    """What `evaluate_checkpoint` compares; None means the documented default."""

    n: Optional[int] = None  # samples per (weights, NFE) = reference latents; default min(reference, 500)
    nfe: Optional[list[int]] = None  # default: the run-spec's sampling.nfe
    seed: int = 0
    # None: the test split, or the validation split when the test split has fewer than 2 latents (tiny sets)
    reference: Optional[Literal["test", "val", "train"]] = None
    batch_size: Optional[int] = None  # default: training.micro_batch_size
    n_train_stats: int = 256  # training latents for the P4-T7 statistics
    device: str = "auto"
    progress: bool = True
    features: FeatureSpec = field(default_factory=lambda: DEFAULT_FEATURES)


def resolve_device(name: str) -> torch.device:
    """--device: 'auto' (CUDA when visible), 'cpu', 'cuda' or 'cuda:N'; anything else is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


class _SetStats:
    """Everything gathered about one set of latents, batch by batch."""

    def __init__(self, edges: np.ndarray, spec: FeatureSpec) -> None:
        self.edges, self.spec = edges, spec
        self.features: list[torch.Tensor] = []
        self.moments = MomentAccumulator()
        self.counts = np.zeros((edges.shape[0], edges.shape[1] - 1))
        self.outside = np.zeros(edges.shape[0])
        self.total = 0
        self.keep: list[torch.Tensor] = []  # normalised latents for the diversity figure
        self.kept = 0

    def add(self, normalised: torch.Tensor, raw: torch.Tensor, with_features: bool = True) -> None:
        if with_features:
            self.features.append(latent_features(normalised, self.spec))
        self.moments.update(raw)
        values = raw.detach().float().cpu().transpose(0, 1).reshape(raw.shape[1], -1).numpy()
        for c in range(values.shape[0]):
            counts, _ = np.histogram(values[c], bins=self.edges[c])
            self.counts[c] += counts
            self.outside[c] += values.shape[1] - counts.sum()
        self.total += values.shape[1]
        if self.kept < DIVERSITY_N:
            part = normalised[: DIVERSITY_N - self.kept].detach().float().cpu()
            self.keep.append(part)
            self.kept += part.shape[0]

    def feature_matrix(self) -> np.ndarray:
        return torch.cat(self.features).numpy() if self.features else np.zeros((0, 0))

    def diversity(self) -> float:
        return mean_pairwise_distance(torch.cat(self.keep)) if self.keep else math.nan

    def densities(self) -> np.ndarray:
        widths = np.diff(self.edges, axis=1)
        return self.counts / max(self.total, 1) / widths


def _reference_batches(data: Any, which: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Normalised reference latents: the test or validation split in order, or the training split in its epoch-0 order."""
    if which in ("val", "test"):
        yield from (data.val_batches(batch_size) if which == "val" else data.test_batches(batch_size))
        return
    batches = data.train_batches(batch_size)
    try:
        for _ in range(batches.steps_per_epoch):
            yield batches.next_batch()
    finally:
        batches.close()


def _take(batches: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    got = 0
    for b in batches:
        b = b[: n - got]
        got += b.shape[0]
        yield b
        if got >= n:
            return


def _available(data: Any, which: str, batch_size: int) -> int:
    if which in ("val", "test"):
        return len(data.val_names if which == "val" else data.test_names)
    return (len(data.train_names) // batch_size) * batch_size  # whole batches of the epoch-0 order


def evaluate_checkpoint(loaded: LoadedCheckpoint, options: EvalOptions, out_dir: Path) -> dict[str, Any]:
    """Run the comparison, write `<out_dir>/evaluation.json` and `latent_histograms.png`; return the results."""
    from tqdm import tqdm

    from neuromf.atomic import atomic_write_text
    from neuromf.data.loader import prepare_data
    from neuromf.evaluation.generate import generate_batches
    from neuromf.evaluation.jsonio import to_json

    spec = loaded.spec
    device = resolve_device(options.device)
    nfes = sorted(set(options.nfe or spec.sampling.nfe))
    if any(k < 1 for k in nfes):
        raise UserError(f"--nfe: every NFE must be >= 1, got {nfes}")
    bs = options.batch_size or spec.training.micro_batch_size
    started = time.time()

    # Streamed from the shard: each latent is read about once, so loading all of them (~2 GB) gains nothing.
    data = prepare_data(spec, torch.device("cpu"), progress=options.progress, residency="stream")
    try:
        if options.reference is None:
            options = replace(options, reference="test" if len(data.test_names) >= 2 or not data.val_names else "val")
            if options.reference == "val" and options.progress:
                print(f"reference: the test split has {len(data.test_names)} latent(s), too few; using the validation split",
                      file=sys.stderr, flush=True)
        split_label = {"test": "test", "val": "validation", "train": "training"}[options.reference]
        if options.reference == "test" and not data.test_names:
            raise UserError("the run has no test split (data.test_fraction is 0); use --reference val or train")
        if options.reference == "val" and not data.val_names:
            raise UserError("the run has no validation split (data.val_fraction is 0); use --reference test or train")
        available = _available(data, options.reference, bs)
        n = options.n if options.n is not None else min(available, DEFAULT_MAX_N)
        if n > available:
            raise UserError(
                f"--n {n}: larger than possible; the {split_label} split "
                f"has {available} latents to compare with (FD and MMD compare sets of equal size)"
                + ("; use a smaller --n or --reference train" if options.reference != "train" else "")
            )
        if options.progress:
            print(f"reference: {n} latents of the {split_label} split", file=sys.stderr, flush=True)
        if n < 2:
            raise UserError(f"--n {n}: FD and MMD need at least 2 samples (the reference split has {available})")
        stats = data.stats.to("cpu")
        mean, std = stats.mean.double().numpy(), stats.std.double().numpy()
        edges = mean[:, None] + std[:, None] * np.linspace(-HIST_SIGMAS, HIST_SIGMAS, HIST_BINS + 1)[None, :]

        reference = _SetStats(edges, options.features)
        for batch in _take(_reference_batches(data, options.reference, bs), n):
            reference.add(batch, stats.denormalise(batch))

        # Training latents: the P4-T7 statistics, and the real-vs-real floor of FD/MMD at this N.
        train = _SetStats(edges, options.features)
        train_batches = data.train_batches(bs)
        n_train = min(max(options.n_train_stats, n), train_batches.steps_per_epoch * bs)
        try:
            seen = 0
            while seen < n_train:
                batch = train_batches.next_batch()[: n_train - seen]
                train.add(batch, stats.denormalise(batch), with_features=seen < n and options.reference != "train")
                seen += batch.shape[0]
        finally:
            train_batches.close()
    finally:
        data.close()

    ref_feats = reference.feature_matrix()
    bandwidths = [f * median_pairwise_distance(ref_feats) for f in BANDWIDTH_FACTORS]

    def compare(feats: np.ndarray) -> dict[str, Any]:
        mmd = mmd2_rbf(feats, ref_feats, bandwidths)
        return {"fd": frechet_distance(feats, ref_feats), "mmd2": list(mmd.values()), "mmd2_mean": float(np.mean(list(mmd.values())))}

    floor = None
    if options.reference != "train":
        train_feats = train.feature_matrix()[:n]
        if train_feats.shape[0] >= 2:
            floor = {"n": int(train_feats.shape[0]), **compare(train_feats)}

    sets: dict[tuple[str, int], _SetStats] = {(w, k): _SetStats(edges, options.features) for w in WEIGHTS for k in nfes}
    bar = tqdm(total=len(WEIGHTS) * math.ceil(n / bs), unit="batch", desc="generating", disable=not options.progress, file=sys.stderr)
    for weights in WEIGHTS:
        net = loaded.network(weights, device)
        for _, by_nfe in generate_batches(spec, net, n, nfes, options.seed, bs, device):
            for k, z in by_nfe.items():
                z = z.cpu()
                sets[(weights, k)].add(z, stats.denormalise(z))
            bar.update(1)
        del net
    bar.close()

    ref_div = reference.diversity()
    train_moments = train.moments.result()
    train_density = train.densities()
    results = []
    for (weights, k), s in sets.items():
        moments = s.moments.result()
        results.append({
            "weights": weights,
            "nfe": k,
            **compare(s.feature_matrix()),
            "diversity": s.diversity(),
            "diversity_ratio": s.diversity() / ref_div if ref_div > 0 else math.nan,
            "moments": moments,
            "histogram_overlap": [histogram_overlap(s.counts[c], train.counts[c]) for c in range(len(moments))],
            "fraction_outside_histogram": (s.outside / max(s.total, 1)).tolist(),
        })

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hist_path = _write_histograms(out_dir / "latent_histograms.png", edges, train_density, sets, nfes, loaded)
    by = {(r["weights"], r["nfe"]): r for r in results}
    summary: dict[str, Any] = {
        "format": "neuromf-evaluation-v1",
        "checkpoint": str(loaded.path.resolve()),
        "run_dir": str(loaded.run_dir.resolve()),
        "name": spec.name,
        "global_step": loaded.global_step,
        "epoch": loaded.epoch,
        "n": n,
        "seed": options.seed,
        "nfe": nfes,
        "reference": options.reference,
        "n_train_stats": train.moments.n // max(int(np.prod(spec.model.spatial_size)), 1),
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        "feature_space": {
            "name": options.features.name,
            "dim": int(ref_feats.shape[1]),
            "levels": list(options.features.levels),
            "grid": options.features.grid,
            "description": options.features.describe(),
        },
        "mmd_bandwidths": bandwidths,
        "mmd_bandwidth_factors": list(BANDWIDTH_FACTORS),
        "reference_floor": floor,
        "reference_diversity": ref_div,
        "normalisation_stats": {"mean": mean.tolist(), "std": std.tolist()},
        "training_moments": train_moments,
        "results": results,
        "ema_better_fd": {str(k): by[("ema", k)]["fd"] < by[("online", k)]["fd"] for k in nfes},
        "files": {"histograms": hist_path.name},
    }
    atomic_write_text(out_dir / "evaluation.json", to_json(summary))
    return summary


def _write_histograms(
    path: Path, edges: np.ndarray, train_density: np.ndarray, sets: dict, nfes: Sequence[int], loaded: LoadedCheckpoint
) -> Path:
    from neuromf.evaluation.plots import COLORS, GREY, Series, histogram_grid, save_png

    panels = []
    for c in range(edges.shape[0]):
        row = []
        for k in nfes:
            series = [Series("training", edges[c], train_density[c], GREY, fill=True)]
            series += [Series(f"{w}", edges[c], sets[(w, k)].densities()[c], COLORS[i]) for i, w in enumerate(WEIGHTS)]
            row.append({"title": f"channel {c}, NFE {k}", "edges": edges[c], "series": series})
        panels.append(row)
    title = f"{loaded.spec.name}: de-normalised latent values, generated vs training (step {loaded.global_step})"
    return save_png(histogram_grid(panels, title=title), path)


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers, for the terminal."""
    lines = [
        f"{summary['name']}: {Path(summary['checkpoint']).name} (step {summary['global_step']}, epoch {summary['epoch']}), "
        f"N = {summary['n']} vs {summary['reference']} latents, feature space {summary['feature_space']['name']} "
        f"({summary['feature_space']['dim']} dims)",
        f"{'weights':8} {'NFE':>4} {'FD':>10} {'MMD2 mean':>10} {'diversity':>10} {'div/real':>9}",
    ]
    for r in summary["results"]:
        lines.append(f"{r['weights']:8} {r['nfe']:>4} {r['fd']:>10.4g} {r['mmd2_mean']:>10.4g} {r['diversity']:>10.4g} {r['diversity_ratio']:>9.3f}")
    floor = summary.get("reference_floor")
    if floor:
        lines.append(f"{'real':8} {'-':>4} {floor['fd']:>10.4g} {floor['mmd2_mean']:>10.4g}   (training vs {summary['reference']} latents, N = {floor['n']})")
    for k, better in summary["ema_better_fd"].items():
        lines.append(f"NFE {k}: FD(EMA) {'<' if better else '>='} FD(online)")
    return "\n".join(lines)
