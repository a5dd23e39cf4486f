"""Validation: the mean loss terms over the val split, for the EMA and the online weights.

Batch j's noise comes from (training.seed, j), so the numbers of different epochs compare; with
several processes rank r takes batches j = r, r + world_size, ... and the sums are all-reduced, so
the numbers do not depend on how many processes share the work (only on the batch size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from neuromf.seeding import derived_generator
from neuromf.spec.schema import RunSpec
from neuromf.train.distributed import Dist
from neuromf.train.state import checkpoint_state

if TYPE_CHECKING:
    from neuromf.train.loop import Trainer

__all__ = ["VAL_KEYS", "validate", "validation_losses"]

VAL_KEYS = ("loss_total", "loss_fm", "loss_mf", "mse_fm", "mse_mf")


@torch.no_grad()
def validation_losses(
    loss: Any,
    net: torch.nn.Module,
    batches: Any,
    spec: RunSpec,
    device: torch.device,
    dtype: torch.dtype | None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Mean loss terms over the val split (VAL_KEYS and mse_total = mse_fm + lambda_mf * mse_mf)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    sums = torch.zeros(len(VAL_KEYS) + 1, dtype=torch.float64, device=device)  # the terms, then the count
    for j, batch in batches.numbered(rank, world):
        out = loss(net, batch, derived_generator(device, "val", spec.training.seed, j), autocast_dtype=dtype)
        size = batch.shape[0]
        sums[:-1] += torch.stack([out[k].double() for k in VAL_KEYS]) * size
        sums[-1] += size
    if dist is not None:
        dist.all_reduce(sums, "sum", "the validation all-reduce")
    values = sums.tolist()
    n = max(values[-1], 1.0)
    means = {k: v / n for k, v in zip(VAL_KEYS, values)}
    means["mse_total"] = means["mse_fm"] + spec.meanflow.lambda_mf * means["mse_mf"]
    return means


def validate(trainer: Trainer, epoch: int) -> None:
    """Validate the EMA and the online weights at the end of `epoch`: log, keep in the history, best.pt on improvement."""
    p = trainer.progress
    if trainer.val_batches is None:
        return
    trainer.ema_net.load_state_dict(trainer.ema.state_dict(), strict=False)
    record: dict[str, Any] = {"step": p.global_step, "epoch": epoch}
    with trainer.interruptible():
        for label, net in (("val", trainer.ema_net), ("val_online", trainer.net)):
            losses = validation_losses(
                trainer.loss, net, trainer.val_batches, trainer.spec, trainer.device, trainer.dtype, trainer.dist
            )
            record.update({f"{label}/{k}": v for k, v in losses.items()})
    trainer.log.log(record)
    p.history["val"].append({k: v for k, v in record.items()})
    if record["val/mse_total"] < p.best_val:  # the all-reduced value: every rank agrees
        p.best_val = record["val/mse_total"]
        if trainer.dist.is_main:
            trainer.checkpoints.save_best(checkpoint_state(trainer))
    trainer.log.say(
        f"epoch {epoch}: val mse (EMA) {record['val/mse_total']:.4f}, online {record['val_online/mse_total']:.4f}"
    )
