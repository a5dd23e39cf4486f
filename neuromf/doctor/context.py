"""What the doctor's checks share: the run-spec, the device, the autocast dtype, a network, the loss, inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from neuromf.spec.schema import RunSpec

__all__ = ["DoctorContext"]


@dataclass
class DoctorContext:
    spec: RunSpec
    device: torch.device
    dtype: torch.dtype | None  # the network's autocast dtype (None: fp32)
    net: torch.nn.Module  # the run's network with MONAI's zero-initialised layers perturbed (non-trivial outputs)
    loss: Any  # the trainer's MeanFlowLoss
    # what one check leaves for a later one (e.g. the largest micro-batch)
    shared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: RunSpec) -> DoctorContext:
        from neuromf.device import autocast_dtype, pick_device
        from neuromf.meanflow.loss import MeanFlowLoss
        from neuromf.model.unet import build_network, perturb_zero_init
        from neuromf.train.runtime import configure_torch

        device = pick_device(spec)
        configure_torch(spec, device)
        net = build_network(spec.model)
        perturb_zero_init(net, std=0.02, generator=torch.Generator().manual_seed(spec.training.seed))
        loss = MeanFlowLoss(spec.meanflow, spec.time_sampling, spec.model.prediction_type)
        return cls(spec, device, autocast_dtype(spec, device), net.to(device), loss)

    @property
    def micro_batch(self) -> int:
        """Latents per micro-batch on one GPU (what one process's step holds at once)."""
        hw, tr = self.spec.hardware, self.spec.training
        return max(1, tr.batch_size // (hw.nodes * hw.gpus_per_node) // tr.accumulate_grad_batches)

    @property
    def micro_batches_per_step(self) -> int:
        return self.spec.training.accumulate_grad_batches

    def latents(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(seed)
        shape = (n, self.spec.model.in_channels, *self.spec.model.spatial_size)
        return torch.randn(shape, generator=g, device=self.device)

    def fresh_net(self) -> torch.nn.Module:
        return copy.deepcopy(self.net).train()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
