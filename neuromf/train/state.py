"""What a checkpoint holds of a run, out of the trainer (`checkpoint_state`) and back in (`restore_state`),
and the loop's own counters (`Progress`).

The keys are written and read here, side by side; neuromf/train/checkpoint.py writes the files
(atomically, with a digest) and neuromf/train/resume.py picks and checks the one to resume from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from neuromf.train.checkpoint import FORMAT, assert_finite, capture_rng_states, restore_rng_states

if TYPE_CHECKING:
    from neuromf.train.loop import Trainer

__all__ = ["Progress", "checkpoint_state", "restore_state"]


@dataclass
class Progress:
    """The loop's own counters; checkpointed with everything else."""

    epoch: int = 0
    global_step: int = 0
    bad_steps: int = 0
    consecutive_bad: int = 0
    best_val: float = math.inf
    finished: bool = False  # the final validation, samples and checkpoint are done: a resume has nothing to do
    pending_epoch_end: int = 0  # a stop signal interrupted this epoch's validation/samples: redone on resume
    history: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"train": [], "val": []})


def checkpoint_state(trainer: Trainer) -> dict[str, Any]:
    """Everything a resume needs, and what `sample`/`evaluate` read (weights, EMA, config, latent statistics)."""
    model_state, ema_state = trainer.net.state_dict(), trainer.ema.state_dict()
    assert_finite(model_state, "model")
    assert_finite(ema_state, "ema")
    p = trainer.progress
    return {
        "format": FORMAT,
        "epoch": p.epoch,
        "global_step": p.global_step,
        "model_state_dict": model_state,
        "ema_state_dict": ema_state,
        "ema_all": trainer.ema.full_state_dict(),
        "optimizer_state_dict": trainer.optimizer.state_dict(),
        "scheduler_state_dict": trainer.scheduler.state_dict(),
        "config": trainer.spec.model_dump(mode="json"),
        "loss_history": p.history,
        "progress": asdict(p),
        "rng": capture_rng_states(),
        "data_state": trainer.batches.state_dict(),
        "latent_stats": trainer.data.stats.state_dict(),  # so samples can be de-normalised without the data
    }


def restore_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Load a checkpoint (chosen and checked by neuromf/train/resume.py) into this rank's objects."""
    trainer.net.load_state_dict(state["model_state_dict"])
    trainer.ema.load_full_state_dict(state["ema_all"])
    trainer.optimizer.load_state_dict(state["optimizer_state_dict"])
    trainer.scheduler.load_state_dict(state["scheduler_state_dict"])
    trainer.batches.load_state_dict(state["data_state"])
    restore_rng_states(state["rng"])  # kept for completeness: the loss noise is a function of the step
    trainer.progress = Progress(**state["progress"])
