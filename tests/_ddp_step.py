"""Run under torchrun by tests/test_distributed.py: one training step per variant, each rank saves what it got.

    torchrun --nproc-per-node 2 tests/_ddp_step.py SPEC OUT_DIR VARIANT...

Variants, each from the same start (weights, a fresh AdamW and LR schedule, same batch, step 0's noise), each one
Trainer.train_step with other parts plugged in:
  ddp        the trainer's own step: gradient passes through DDP, no-grad JVP on the bare module
  bypass     the gradient passes on the bare module too (no DDP): nothing synchronises the gradients
  naive_ddp  the naive graph-building torch.func.jvp loss (reference.py) with the DDP wrapper in both roles
OUT_DIR/<variant>_rank<r>.pt holds {"grads", "params", "applied", "loss"} or {"error"}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(spec_path: str, out_dir: str, variants: list[str]) -> None:
    from neuromf.bench.reference import as_compute, naive_imf_loss
    from neuromf.model.unet import perturb_zero_init
    from neuromf.spec import load_runspec
    from neuromf.train.loop import Trainer
    from neuromf.train.schedule import build_optimizer, build_scheduler
    from neuromf.train.state import Progress

    trainer = Trainer(load_runspec(spec_path))
    spec = trainer.spec
    perturb_zero_init(trainer.net, generator=torch.Generator().manual_seed(0))  # the same on every rank
    start = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    batch = trainer.batches.next_batch()
    ddp, bare, eager = trainer.grad_net, trainer.net, trainer.compute
    for variant in variants:
        # the same start: weights, a fresh AdamW and LR schedule, step 0 (its noise)
        trainer.net.load_state_dict(start)
        trainer.optimizer = build_optimizer(list(bare.parameters()), spec.training, trainer.device)
        trainer.scheduler = build_scheduler(trainer.optimizer, trainer.total_steps, spec.training)
        trainer.progress = Progress()
        trainer.grad_net, trainer.compute = ddp, eager
        try:
            if variant == "bypass":
                trainer.grad_net = bare
            elif variant == "naive_ddp":
                trainer.compute = as_compute(
                    naive_imf_loss, mf=spec.meanflow, prediction_type=spec.model.prediction_type
                )
            elif variant != "ddp":
                raise ValueError(variant)
            applied, metrics = trainer.train_step(batch)
            result = {
                "grads": {n: p.grad.clone() for n, p in bare.named_parameters() if p.grad is not None},
                "params": {k: v.clone() for k, v in bare.state_dict().items()},
                "applied": applied,
                "loss": float(metrics["loss_total"]),
            }
        except Exception as e:  # recorded, not raised: the test reads what each variant did
            result = {"error": f"{type(e).__name__}: {e}"}
        torch.save(result, Path(out_dir) / f"{variant}_rank{trainer.dist.rank}.pt")
    trainer.log.close()
    trainer.dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
