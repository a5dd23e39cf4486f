"""training.gradient_checkpointing: the gradient passes recompute each UNet block, gradients are unchanged."""

from __future__ import annotations

import pytest
import torch
from imf_tiny import tiny_net
from torch import nn

from neuromf.meanflow.loss import MeanFlowLoss
from neuromf.model.unet import MeanFlowUNet, set_gradient_checkpointing
from neuromf.spec.schema import MeanFlowSpec, TimeSamplingSpec


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in net.parameters() if p.grad is not None]


def _count_calls(module: nn.Module) -> list[bool]:
    """Records, per forward call of `module`, whether autograd was recording.

    A pre-hook: non-reentrant checkpointing stops a recomputation as soon as it has every
    tensor backward needs, so a (post-)forward hook would not see recomputations.
    """
    calls: list[bool] = []
    module.register_forward_pre_hook(lambda m, i: calls.append(torch.is_grad_enabled()))
    return calls


def test_gradients_bit_identical_and_blocks_recomputed_only_in_gradient_passes() -> None:
    net = tiny_net(dtype=torch.float64)
    loss = MeanFlowLoss(MeanFlowSpec(), TimeSamplingSpec())
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn((4, 4, 8, 8, 8), generator=g, dtype=torch.float64)
    e, t, r = loss.draw(z0, g)
    calls = _count_calls(net.unet.down_blocks[1])

    out = loss.compute(net, z0, e.double(), t, r)
    out["loss_total"].backward()
    plain, plain_calls = _grads(net), list(calls)
    # pass 1 (grad), the JVP (no grad), pass 2 (grad); nothing runs again in backward
    assert plain_calls == [True, False, True]

    net.zero_grad(set_to_none=True)
    calls.clear()
    set_gradient_checkpointing(net, True)
    out_ck = loss.compute(net, z0, e.double(), t, r)
    out_ck["loss_total"].backward()
    # the two gradient passes' blocks run again during backward; the no-grad JVP is never checkpointed
    assert calls.count(False) == 1 and calls.count(True) == 4, calls
    assert torch.equal(out_ck["loss_total"], out["loss_total"])
    for a, b in zip(_grads(net), plain, strict=True):
        assert torch.equal(a, b)


def test_checkpointing_lowers_gradient_pass_memory() -> None:
    """The saved activations of a forward pass shrink: count the bytes autograd keeps for backward."""

    def saved_bytes(net: MeanFlowUNet) -> int:
        total = 0

        def pack(x: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += x.numel() * x.element_size()
            return x

        x = torch.randn(2, 4, 16, 16, 16)
        t = torch.tensor([0.3, 0.7])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            net(x, t, t * 0.5).sum().backward()
        return total

    net = tiny_net()
    full = saved_bytes(net)
    set_gradient_checkpointing(net, True)
    assert saved_bytes(net) < 0.5 * full


def test_set_gradient_checkpointing_reaches_through_a_wrapper_and_rejects_others() -> None:
    net = tiny_net()

    class Wrapper(nn.Module):  # the shape of DDP: the network is .module
        def __init__(self) -> None:
            super().__init__()
            self.module = net

    set_gradient_checkpointing(Wrapper(), True)
    assert net.gradient_checkpointing is True
    set_gradient_checkpointing(net, False)
    assert net.gradient_checkpointing is False
    with pytest.raises(TypeError, match="MeanFlowUNet"):
        set_gradient_checkpointing(nn.Linear(2, 2), True)
