"""torch.compile of the loss, with a graph pass that removes the JVP's products with all-zero weight tangents.

Why the pass: PyTorch's forward-mode rule for a convolution is
    conv(dx, W) + conv(x, dW) (+ db)
and for a linear layer the same with matrix products. In our JVP the weights are
constants, so dW and db are zeros, but the rule still computes conv(x, 0): one
whole extra convolution per layer, a third of the JVP's FLOPs (the JVP costs 3
forwards instead of 2). Under torch.compile these products appear in the graph
as `convolution(x, expand(zeros))` / `mm(x, zeros)`; Inductor does not fold them.
`FoldZeroTangentProducts` replaces each product that has an all-zero factor by
zeros of its shape before Inductor lowers the graph. The result is exact
(x * 0 = 0 for finite x; a non-finite activation makes the loss non-finite
anyway, and the step is then skipped).

Eager mode keeps PyTorch's rule: a per-layer replacement rule (autograd.Function
with a `jvp`) removes the same products but its Python overhead ate the gain on
the CPU, and under torch.compile Dynamo drops custom `jvp` rules of functions
run under no_grad (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["COMPILE_MODES", "FoldZeroTangentProducts", "compile_loss", "uses_cuda_graphs"]

# training.compile_mode: torch.compile's modes. "reduce-overhead" records the step's CUDA kernels as CUDA graphs
# (one launch per graph instead of one per kernel: the JVP's many small kernels gain most); the max-autotune modes
# benchmark kernel choices at compile time (minutes longer). On a CPU only "default" makes a difference.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

aten = torch.ops.aten

# Ops whose output holds the same values as their first argument (views, casts, copies).
_SAME_VALUES = {
    aten.alias.default,
    aten.expand.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.t.default,
    aten.permute.default,
    aten.transpose.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.clone.default,
    aten._to_copy.default,
}
_ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten._efficientzerotensor.default}
_FULL = {aten.full.default, aten.full_like.default, aten.new_full.default}


def is_all_zero(node: Any) -> bool:
    """True if an FX node's value is all zeros by construction (zeros/full(0), through views and casts)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _SAME_VALUES:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target in _ZEROS:
        return True
    fill_index = 2 if node.target == aten.new_full.default else 1
    return node.target in _FULL and len(node.args) > fill_index and node.args[fill_index] == 0


def product_is_zero(node: torch.fx.Node) -> bool:
    """A convolution or matrix product whose result is all zeros because a factor (and the bias) is."""
    a = node.args
    if node.target == aten.convolution.default:
        return (is_all_zero(a[0]) or is_all_zero(a[1])) and (a[2] is None or is_all_zero(a[2]))
    if node.target in (aten.mm.default, aten.bmm.default):
        return is_all_zero(a[0]) or is_all_zero(a[1])
    if node.target == aten.addmm.default:
        return is_all_zero(a[0]) and (is_all_zero(a[1]) or is_all_zero(a[2]))
    return False


class FoldZeroTangentProducts(CustomGraphPass):
    """Inductor post-grad pass: replace zero-by-construction convolutions and matmuls with zeros."""

    def __init__(self) -> None:
        self.folded = 0  # products replaced so far (graphs served from Inductor's cache are not re-passed)

    def __call__(self, graph: torch.fx.Graph) -> None:
        # Look first, change after: a graph this pass does not understand is left as it is.
        targets = [n for n in graph.nodes if n.op == "call_function" and "val" in n.meta and product_is_zero(n)]
        for node in targets:
            val = node.meta["val"]
            with graph.inserting_before(node):
                zeros = graph.call_function(
                    aten.full.default,
                    (list(val.shape), 0),
                    {"dtype": val.dtype, "device": val.device, "pin_memory": False},
                )
            zeros.meta["val"] = val.new_zeros(val.shape)
            node.replace_all_uses_with(zeros)
            graph.erase_node(node)
        if targets:
            graph.eliminate_dead_code()
        self.folded += len(targets)

    def uuid(self) -> Any | None:
        return get_hash_for_files((__file__,))  # Inductor's cache key: a change here recompiles


def uses_cuda_graphs(mode: str) -> bool:
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs"))


def compile_loss(fn: Callable[..., Any], fold_zero_tangents: bool = True, mode: str = "default") -> Callable[..., Any]:
    """torch.compile(fn) in `mode`, with FoldZeroTangentProducts unless `fold_zero_tangents` is False (lazy, like compile).

    torch.compile takes a mode or an options dict, not both: the mode is given as its options (Inductor's
    own table), with the pass added. Under CUDA graphs every call is marked as a new step, so that the graphs'
    memory of the previous call (its outputs, consumed by then) may be reused.
    """
    from torch._inductor import list_mode_options

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    options: dict[str, Any] = dict(list_mode_options(mode))
    if fold_zero_tangents:
        options["post_grad_custom_pre_pass"] = FoldZeroTangentProducts()
    compiled = torch.compile(fn, options=options or None)
    if not uses_cuda_graphs(mode):
        return compiled

    def each_call_a_new_step(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return each_call_a_new_step
