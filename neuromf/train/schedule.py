"""Learning rate: linear warmup, then cosine decay (or constant) over the remaining optimizer steps."""

from __future__ import annotations

import math

import torch

from neuromf.spec.schema import TrainingSpec


def lr_factor(step: int, total_steps: int, spec: TrainingSpec) -> float:
    """Multiplier of spec.lr after `step` optimizer steps."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine


def build_optimizer(params: list[torch.nn.Parameter], spec: TrainingSpec, device: torch.device) -> torch.optim.AdamW:
    # The fused CUDA kernel is one launch for all parameters; CPU keeps the default (foreach) path.
    return torch.optim.AdamW(
        params,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.adam_eps,
        weight_decay=spec.weight_decay,
        fused=device.type == "cuda" or None,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, spec: TrainingSpec
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, spec))
