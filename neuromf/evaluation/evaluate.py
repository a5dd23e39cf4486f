"""`neuromf evaluate`: generated samples of the EMA and online weights against held-out data.

For each weights (ema, online) and each NFE, N samples are generated from the
same per-sample noise and compared with N reference latents (the test split
when the data has one, else validation) in a feature space (featurize.py):
the weight-free pooled statistics of latents (features.py; not comparable
with papers), or a published extractor on decoded volumes (MedicalNet 3D,
RadImageNet 2.5D: extractors.py, image_features.py). Fréchet distance (FID;
for 2.5D one per plane and their mean) and RBF-kernel MMD^2 at three
bandwidths (0.5, 1 and 2 times the median distance between reference
feature vectors); in image space the mean pairwise MS-SSIM of samples and of
real volumes (diversity, lower = more diverse). Beside them: per-channel
mean, std, skewness and kurtosis of the de-normalised samples against
training latents (for the verification test P4-T7, docs/design.md, 'Verification tests') with a histogram PNG, and the mean pairwise distance
of the samples against that of real latents (mode collapse shows as a ratio
well below 1). "reference_floor" is the same FD/MMD between N training and N
held-out (test or validation) latents: what a perfect model would score at this N.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from neuromf.errors import UserError
from neuromf.evaluation.features import DEFAULT_FEATURES, FeatureSpec
from neuromf.evaluation.metrics import frechet_distance_of_fits, histogram_overlap, median_pairwise_distance, mmd2_rbf
from neuromf.evaluation.runs import LoadedCheckpoint
from neuromf.evaluation.sets import SetStats, available, reference_batches, take

__all__ = ["EvalOptions", "evaluate_checkpoint", "format_summary", "DEFAULT_MAX_N"]

DEFAULT_MAX_N = 500  # the sample count P4-T6 asks for (docs/design.md, 'Verification tests'); the default N is min(reference size, this)
BANDWIDTH_FACTORS = (0.5, 1.0, 2.0)
HIST_BINS, HIST_SIGMAS = 80, 6.0  # histogram range: stats mean +- 6 std per channel
WEIGHTS: tuple[Literal["ema", "online"], ...] = ("ema", "online")


@dataclass
class EvalOptions:
    """What `evaluate_checkpoint` compares; None means the documented default."""

    n: int | None = None  # samples per (weights, NFE) = reference latents; default min(reference, 500)
    nfe: list[int] | None = None  # default: the run-spec's sampling.nfe
    seed: int = 0
    reference: Literal["auto", "val", "test", "train"] = "auto"  # auto: test when the data has it, else val
    batch_size: int | None = None  # default: training.micro_batch_size
    n_train_stats: int = 256  # training latents for the P4-T7 statistics
    device: str = "auto"
    progress: bool = True
    features: FeatureSpec = field(default_factory=lambda: DEFAULT_FEATURES)  # the pooled statistics
    extractor: str = "pooled"  # pooled | medicalnet3d | radimagenet2p5d
    weights_file: Path | None = None  # the extractor's weights
    space: str | None = None  # image | latent; default image for extractors, latent for pooled
    diversity_samples: int = 16  # volumes per set for the MS-SSIM diversity (image space)
    which: tuple[str, ...] = ("ema", "online")
    histograms: bool = True
    train_floor: bool = True  # also the training-vs-reference floor (decodes N more volumes in image space)

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> EvalOptions:
        """Options with the run-spec's evaluation section as the defaults."""
        e = spec.evaluation
        base = dict(
            n=e.n,
            extractor=e.features,
            weights_file=e.weights,
            space=e.resolved_space,
            diversity_samples=e.diversity_samples,
        )
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def evaluate_checkpoint(loaded: LoadedCheckpoint, options: EvalOptions, out_dir: Path | None) -> dict[str, Any]:
    """Run the comparison, write `<out_dir>/evaluation.json` and `latent_histograms.png` (unless out_dir is None)."""
    from neuromf.device import resolve_device
    from neuromf.evaluation.featurize import open_featurizer

    spec = loaded.spec
    device = resolve_device(options.device)
    nfes = sorted(set(options.nfe or spec.sampling.nfe))
    if any(k < 1 for k in nfes):
        raise UserError(f"--nfe: every NFE must be >= 1, got {nfes}")
    space = options.space or ("latent" if options.extractor == "pooled" else "image")
    with open_featurizer(spec, options.extractor, options.weights_file, space, device) as featurizer:
        return _evaluate(loaded, options, out_dir, featurizer, nfes, device)


def _evaluate(
    loaded: LoadedCheckpoint,
    options: EvalOptions,
    out_dir: Path | None,
    featurizer: Any,
    nfes: list[int],
    device: torch.device,
) -> dict[str, Any]:
    from tqdm import tqdm

    from neuromf.atomic import atomic_write_text
    from neuromf.data.prepare import prepare_data
    from neuromf.evaluation.featurize import held_out_split
    from neuromf.evaluation.generate import generate_batches
    from neuromf.evaluation.jsonio import to_json

    spec = loaded.spec
    bs = options.batch_size or spec.training.micro_batch_size
    keep = options.diversity_samples if featurizer.space == "image" else 0
    started = time.time()

    # Streamed from the shard: each latent is read about once, so loading all of them (~2 GB) gains nothing.
    data = prepare_data(spec, torch.device("cpu"), progress=options.progress, residency="stream")
    try:
        which = held_out_split(data) if options.reference == "auto" else options.reference
        if which == "val" and not data.val_names:
            raise UserError("the run has no validation split (data.val_fraction is 0); use --reference train")
        if which == "test" and not getattr(data, "test_names", None):
            raise UserError("the run's data has no test split; use --reference val or train")
        split_name = {"val": "validation", "test": "test", "train": "training"}[which]
        have = available(data, which, bs)
        n = options.n if options.n is not None else min(have, DEFAULT_MAX_N)
        if n > have:
            raise UserError(
                f"--n {n}: larger than possible; the {split_name} split has {have} latents to compare with "
                "(FD and MMD compare sets of equal size)"
                + ("; use a smaller --n or --reference train" if which != "train" else "")
            )
        if options.progress:
            if options.reference == "auto" and which == "val" and data.test_names:
                print(
                    f"reference: the test split has {len(data.test_names)} latent(s), too few; using the validation split",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"reference: {n} latents of the {split_name} split", file=sys.stderr, flush=True)
        if n < 2:
            raise UserError(f"--n {n}: FD and MMD need at least 2 samples (the reference split has {have})")
        stats = data.stats.to("cpu")
        mean, std = stats.mean.double().numpy(), stats.std.double().numpy()
        edges = mean[:, None] + std[:, None] * np.linspace(-HIST_SIGMAS, HIST_SIGMAS, HIST_BINS + 1)[None, :]

        reference = SetStats(edges, featurizer, keep)
        for batch in take(reference_batches(data, which, bs), n):
            reference.add(batch, stats.denormalise(batch))

        # Training latents: the P4-T7 statistics, and the real-vs-real floor of FD/MMD at this N.
        train = SetStats(edges, featurizer)
        train_batches = data.train_batches(bs)
        n_train = min(max(options.n_train_stats, n), train_batches.steps_per_epoch * bs)
        floor_wanted = options.train_floor and which != "train"
        try:
            seen = 0
            while seen < n_train:
                batch = train_batches.next_batch()[: n_train - seen]
                train.add(batch, stats.denormalise(batch), feature_rows=max(n - seen, 0) if floor_wanted else 0)
                seen += batch.shape[0]
        finally:
            train_batches.close()
    finally:
        data.close()

    ref_vectors = reference.vectors()
    bandwidths = [f * median_pairwise_distance(ref_vectors) for f in BANDWIDTH_FACTORS]
    ref_fits = {plane: acc.fit() for plane, acc in reference.fits.items()}

    def compare(s: SetStats) -> dict[str, Any]:
        per_plane = {plane: frechet_distance_of_fits(*s.fits[plane].fit(), *ref_fits[plane]) for plane in ref_fits}
        mmd = mmd2_rbf(s.vectors(), ref_vectors, bandwidths)
        out: dict[str, Any] = {
            "fd": float(np.mean(list(per_plane.values()))),
            "mmd2": list(mmd.values()),
            "mmd2_mean": float(np.mean(list(mmd.values()))),
        }
        if len(per_plane) > 1:
            out["fd_planes"] = per_plane
        return out

    floor = None
    if floor_wanted and train.per_volume and train.vectors().shape[0] >= 2:
        floor = {"n": int(train.vectors().shape[0]), **compare(train)}

    sets: dict[tuple[str, int], SetStats] = {
        (w, k): SetStats(edges, featurizer, keep) for w in options.which for k in nfes
    }
    bar = tqdm(
        total=len(options.which) * math.ceil(n / bs),
        unit="batch",
        desc="generating",
        disable=not options.progress,
        file=sys.stderr,
    )
    for weights in options.which:
        net = loaded.network(weights, device)  # type: ignore[arg-type]
        for _, by_nfe in generate_batches(spec, net, n, nfes, options.seed, bs, device):
            for k, z in by_nfe.items():
                z = z.cpu()
                sets[(weights, k)].add(z, stats.denormalise(z))
            bar.update(1)
        del net
    bar.close()

    ref_div = reference.diversity()
    ref_ms_ssim = reference.ms_ssim()
    train_density = train.densities()
    results = []
    for (weights, k), s in sets.items():
        moments = s.moments.result()
        ms = s.ms_ssim()
        results.append(
            {
                "weights": weights,
                "nfe": k,
                **compare(s),
                "ms_ssim": ms["mean"] if ms else None,
                "diversity": s.diversity(),
                "diversity_ratio": s.diversity() / ref_div if ref_div > 0 else math.nan,
                "moments": moments,
                "histogram_overlap": [histogram_overlap(s.counts[c], train.counts[c]) for c in range(len(moments))],
                "fraction_outside_histogram": (s.outside / max(s.total, 1)).tolist(),
            }
        )

    by = {(r["weights"], r["nfe"]): r for r in results}
    info = featurizer.info()
    summary: dict[str, Any] = {
        "format": "neuromf-evaluation-v2",
        "checkpoint": str(loaded.path.resolve()),
        "run_dir": str(loaded.run_dir.resolve()),
        "name": spec.name,
        "global_step": loaded.global_step,
        "epoch": loaded.epoch,
        "n": n,
        "seed": options.seed,
        "nfe": nfes,
        "reference": which,
        "split": which,
        "n_train_stats": train.moments.n // max(int(np.prod(spec.model.spatial_size)), 1),
        "device": str(device),
        "seconds": round(time.time() - started, 1),
        "extractor": info,
        "feature_space": {
            "name": options.features.name if featurizer.kind == "pooled" else featurizer.kind,
            "space": featurizer.space,
            "dim": int(ref_vectors.shape[1]),
            "planes": sorted(ref_fits),
            "description": info["description"]
            + (f"; on {'decoded volumes' if featurizer.space == 'image' else 'normalised latents'}"),
            "comparable_with_literature": info["comparable_with_literature"],
        },
        "mmd_bandwidths": bandwidths,
        "mmd_bandwidth_factors": list(BANDWIDTH_FACTORS),
        "reference_floor": floor,
        "reference_diversity": ref_div,
        "reference_ms_ssim": ref_ms_ssim["mean"] if ref_ms_ssim else None,
        "ms_ssim_settings": {k: v for k, v in (ref_ms_ssim or {}).items() if k != "mean"} or None,
        "normalisation_stats": {"mean": mean.tolist(), "std": std.tolist()},
        "training_moments": train.moments.result(),
        "results": results,
        "ema_better_fd": {str(k): by[("ema", k)]["fd"] < by[("online", k)]["fd"] for k in nfes}
        if len(options.which) == 2
        else None,
        "files": {},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if options.histograms:
            summary["files"]["histograms"] = _write_histograms(
                out_dir / "latent_histograms.png", edges, train_density, sets, nfes, loaded, options.which
            ).name
        atomic_write_text(out_dir / "evaluation.json", to_json(summary))
    return summary


def _write_histograms(
    path: Path,
    edges: np.ndarray,
    train_density: np.ndarray,
    sets: dict,
    nfes: Sequence[int],
    loaded: LoadedCheckpoint,
    which: Sequence[str] = WEIGHTS,
) -> Path:
    from neuromf.evaluation.plots import COLORS, GREY, Series, histogram_grid, save_png

    panels = []
    for c in range(edges.shape[0]):
        row = []
        for k in nfes:
            series = [Series("training", edges[c], train_density[c], GREY, fill=True)]
            series += [Series(f"{w}", edges[c], sets[(w, k)].densities()[c], COLORS[i]) for i, w in enumerate(which)]
            row.append({"title": f"channel {c}, NFE {k}", "edges": edges[c], "series": series})
        panels.append(row)
    title = f"{loaded.spec.name}: de-normalised latent values, generated vs training (step {loaded.global_step})"
    return save_png(histogram_grid(panels, title=title), path)


def fd_label(summary: dict[str, Any]) -> str:
    """What the FD column is: 'FID (medicalnet3d, image space)' or the pooled FD, marked as not comparable."""
    fs = summary["feature_space"]
    if fs.get("comparable_with_literature"):
        return f"FID ({fs['name']}, {fs.get('space', 'image')} space)"
    return f"pooled FD ({fs.get('space', 'latent')} space; not comparable with published FIDs)"


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers, for the terminal."""
    fs = summary["feature_space"]
    planes = [p for p in fs.get("planes", []) if p in ("xy", "yz", "zx")]
    lines = [
        f"{summary['name']}: {Path(summary['checkpoint']).name} (step {summary['global_step']}, epoch {summary['epoch']}), "
        f"N = {summary['n']} vs {summary['reference']} split, {fd_label(summary)} ({fs['dim']} dims per volume)",
        f"{'weights':8} {'NFE':>4} {'FD':>10} "
        + "".join(f"{'FD ' + p:>10} " for p in planes)
        + f"{'MMD2 mean':>10} {'MS-SSIM':>8} {'diversity':>10} {'div/real':>9}",
    ]

    def num(v: Any, width: int, fmt: str = ".4g") -> str:
        return f"{v:>{width}{fmt}}" if isinstance(v, (int, float)) and math.isfinite(v) else f"{'-':>{width}}"

    for r in summary["results"]:
        lines.append(
            f"{r['weights']:8} {r['nfe']:>4} {num(r['fd'], 10)} "
            + "".join(f"{num(r['fd_planes'][p], 10)} " for p in planes)
            + f"{num(r['mmd2_mean'], 10)} {num(r.get('ms_ssim'), 8, '.3f')} {num(r['diversity'], 10)} {num(r['diversity_ratio'], 9, '.3f')}"
        )
    floor = summary.get("reference_floor")
    if floor:
        lines.append(
            f"{'real':8} {'-':>4} {num(floor['fd'], 10)} "
            + "".join(f"{num(floor['fd_planes'][p], 10)} " for p in planes)
            + f"{num(floor['mmd2_mean'], 10)} {num(summary.get('reference_ms_ssim'), 8, '.3f')}"
            f"   (training vs {summary['reference']}, N = {floor['n']}; MS-SSIM of real volumes)"
        )
    for k, better in (summary.get("ema_better_fd") or {}).items():
        lines.append(f"NFE {k}: FD(EMA) {'<' if better else '>='} FD(online)")
    return "\n".join(lines)
