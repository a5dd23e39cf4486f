"""FoldZeroTangentProducts: the JVP's products with an all-zero weight tangent go, nothing else changes.

The pass works on FX graphs; make_fx gives the same ATen graph of torch.func.jvp that Inductor
sees, without a (minutes-long) Inductor compile. The compiled loss with the pass is checked
against eager and the naive reference in the slow compile tests (test_meanflow_loss, test_bench).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from neuromf.train.compile import FoldZeroTangentProducts

aten = torch.ops.aten
PRODUCTS = (aten.convolution.default, aten.mm.default, aten.bmm.default, aten.addmm.default)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4**3, 5))


def _products(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target in PRODUCTS for n in gm.graph.nodes)


def _fold(fn: Callable[..., object], *args: torch.Tensor) -> tuple[torch.fx.GraphModule, int, int]:
    gm = make_fx(fn)(*args)
    before = _products(gm)
    fold = FoldZeroTangentProducts()
    fold(gm.graph)
    gm.recompile()
    assert _products(gm) == before - fold.folded
    return gm, before, fold.folded


def test_jvp_drops_the_zero_weight_tangent_products_and_keeps_the_values() -> None:
    net = _net()
    x, dx = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 4, 4, 4)

    def jvp(x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return torch.func.jvp(net, (x,), (dx,))

    gm, before, folded = _fold(jvp, x, dx)
    # PyTorch's rules: conv(x, W) + [conv(dx, W) + conv(x, 0)], addmm(b, x, W^T) + [mm(dx, W^T) + mm(x, 0)]
    assert (before, folded) == (6, 2)
    primal, tangent = gm(x, dx)
    ref_primal, ref_tangent = jvp(x, dx)
    assert torch.equal(primal, ref_primal) and torch.equal(tangent, ref_tangent)
    assert float(tangent.detach().abs().sum()) > 0


def test_ordinary_forward_and_backward_is_left_alone() -> None:
    net = _net()
    x = torch.randn(2, 2, 4, 4, 4)
    params = dict(net.named_parameters())

    def loss_and_grads(x: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = torch.func.functional_call(net, dict(zip(params, p)), (x,))
        return torch.autograd.grad(out.square().sum(), p)

    gm, before, folded = _fold(loss_and_grads, x, *[p.detach().requires_grad_() for p in params.values()])
    assert before > 0 and folded == 0
