"""Exponential moving averages of the weights, kept in fp32.

The default is one EMA with a fixed decay (0.999; docs/design.md, 'EMA: one average, decay 0.999'). The
optional multi-half-life mode keeps one extra EMA per half-life h (in optimizer
steps), each with decay 0.5 ** (1 / h).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def decay_for_half_life(half_life: float) -> float:
    return 0.5 ** (1.0 / half_life)


class EMA:
    """Shadow copies of a module's floating-point parameters and buffers, updated with lerp."""

    def __init__(self, module: nn.Module, decay: float = 0.999, half_lives: list[int] | None = None) -> None:
        self.decays: dict[str, float] = {"ema": decay}
        for h in half_lives or []:
            self.decays[f"ema_h{h}"] = decay_for_half_life(h)
        self.shadows: dict[str, dict[str, torch.Tensor]] = {
            name: {k: v.detach().float().clone() for k, v in self._tracked(module)} for name in self.decays
        }

    @staticmethod
    def _tracked(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                yield k, v

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        current = dict(self._tracked(module))
        for name, decay in self.decays.items():
            shadow = self.shadows[name]
            keys = list(shadow)
            targets = [current[k].float() for k in keys]
            torch._foreach_lerp_([shadow[k] for k in keys], targets, 1.0 - decay)

    def state_dict(self, name: str = "ema") -> dict[str, torch.Tensor]:
        """The shadow weights of one EMA, as a state dict for the module (non-float entries excluded)."""
        return self.shadows[name]

    def full_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.shadows

    def load_full_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if set(state) != set(self.shadows):
            raise ValueError(
                f"EMA set differs: checkpoint has {sorted(state)}, run-spec asks for {sorted(self.shadows)}"
            )
        for name, shadow in state.items():
            for k, v in shadow.items():
                self.shadows[name][k].copy_(v)
