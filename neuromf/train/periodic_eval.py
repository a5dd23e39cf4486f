"""Periodic evaluation during training: a small-N FID of the EMA weights (run-spec `evaluation.every_n_epochs`).

So a long run shows whether its samples improve, not only whether the loss falls. The feature space is the
run-spec's `evaluation` section (pooled statistics, or a published extractor on decoded volumes). The
reference (the first `evaluation.periodic_n` latents of the test split when the data has one, else of the
validation split) is featurised once per run and kept as Gaussian fits; each evaluation generates
`periodic_n` one-step samples from fixed noise, loads the extractor (and the VAE) for that moment only, and
frees them before training resumes. With a small N the FID is biased upwards: compare its values with each
other across epochs, not with `neuromf evaluate` at N = 500.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from neuromf.errors import UserError
from neuromf.spec.schema import RunSpec

__all__ = ["periodic_evaluation_due", "periodic_evaluation"]

_REFERENCE_CACHE: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def periodic_evaluation_due(spec: RunSpec, epoch: int, final: bool) -> bool:
    every = spec.evaluation.every_n_epochs
    return every is not None and (final or epoch % every == 0)


def _fits(
    featurizer: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from neuromf.evaluation.metrics import GaussianAccumulator

    acc: dict[str, GaussianAccumulator] = {}
    for normalised, raw in batches:
        for plane, rows in featurizer.features(featurizer.images(normalised, raw)).items():
            acc.setdefault(plane, GaussianAccumulator()).add(rows.numpy())
    return {plane: a.fit() for plane, a in acc.items()}


@torch.no_grad()
def periodic_evaluation(
    spec: RunSpec, ema_net: nn.Module, data: Any, epoch: int, step: int, device: torch.device
) -> dict[str, Any]:
    """One log record: {"step", "epoch", "eval/fid_ema_nfe1", per-plane "eval/fid_ema_nfe1_<plane>", ...}."""
    from neuromf.evaluation.featurize import held_out_split

    split = held_out_split(data)
    n = min(spec.evaluation.periodic_n, len(getattr(data, f"{split}_names")))
    if n < 2:
        return {
            "step": step,
            "epoch": epoch,
            "event": f"periodic evaluation skipped: the {split} split has {n} latents",
        }
    try:
        return _evaluate(spec, ema_net, data, epoch, step, device, split, n)
    except UserError as err:  # a missing or wrong extractor file must not end hours of training
        return {"step": step, "epoch": epoch, "event": f"periodic evaluation skipped: {'; '.join(err.problems)}"}


def _evaluate(
    spec: RunSpec, ema_net: nn.Module, data: Any, epoch: int, step: int, device: torch.device, split: str, n: int
) -> dict[str, Any]:
    from neuromf.evaluation.featurize import open_featurizer
    from neuromf.evaluation.generate import generate_batches
    from neuromf.evaluation.metrics import frechet_distance_of_fits

    e = spec.evaluation
    started = time.perf_counter()
    stats = data.stats.to("cpu")
    bs = spec.training.micro_batch_size
    was_training = ema_net.training
    ema_net.eval()
    try:
        with open_featurizer(spec, e.features, e.weights, e.resolved_space, device) as featurizer:
            key = (str(spec.paths.run_dir), e.features, str(e.weights), e.resolved_space, split, n)
            if key not in _REFERENCE_CACHE:
                reference, got = [], 0
                for batch in getattr(data, f"{split}_batches")(bs):
                    batch = batch[: n - got].float().cpu()
                    reference.append((batch, stats.denormalise(batch)))
                    got += batch.shape[0]
                    if got >= n:
                        break
                _REFERENCE_CACHE[key] = _fits(featurizer, reference)
            samples = []
            for _, by_nfe in generate_batches(spec, ema_net, n, [1], spec.sampling.seed, bs, device):
                z = by_nfe[1].float().cpu()
                samples.append((z, stats.denormalise(z)))
            fits = _fits(featurizer, samples)
    finally:
        ema_net.train(was_training)
    ref = _REFERENCE_CACHE[key]
    per_plane = {plane: frechet_distance_of_fits(*fits[plane], *ref[plane]) for plane in ref}
    record: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "eval/fid_ema_nfe1": float(np.mean(list(per_plane.values()))),
    }
    if len(per_plane) > 1:
        record.update({f"eval/fid_ema_nfe1_{plane}": v for plane, v in per_plane.items()})
    record.update(
        {
            "eval/n": n,
            "eval/seconds": round(time.perf_counter() - started, 2),
            "eval_features": f"{e.features} ({e.resolved_space} space) vs {split}",
        }
    )
    return record
