"""Numerics on this device: bf16 conv3d and the network's bf16 forward against fp32; the JVP against a finite difference.

Known hazard: cuDNN 9.10.2 returns silently wrong bf16 conv3d results for large inputs (pytorch#163539).
The errors compared are relative L2 norms ||a - b|| / ||b||. Rounding inputs and outputs to bf16 (8
significant bits) gives ~3e-3 on one convolution and ~1e-2 through the whole network; a wrong kernel gives
O(1). The fp32 references run with TF32 off, so they are real fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from neuromf.doctor.context import DoctorContext
from neuromf.doctor.result import CheckResult

__all__ = [
    "CONV_TOLERANCE",
    "FORWARD_TOLERANCE",
    "JVP_TOLERANCE",
    "check_conv3d_bf16",
    "check_forward_bf16",
    "check_jvp",
]

CONV_TOLERANCE = 2e-2
FORWARD_TOLERANCE = 5e-2
JVP_TOLERANCE = {"fp32": 1e-2, "bf16": 1e-1}  # fp32 on a GPU multiplies in TF32 (10 bits) during training
# The shape of pytorch#163539's reproduction (16 -> 16 channels, kernel 1x3x3): ~30 GB of GPU memory to test.
BUG_163539_SHAPE = (1, 16, 124, 1282, 722)

Conv = Callable[..., torch.Tensor]
_NO_AUTOCAST = "the run computes in fp32 here (training.precision fp32, or bf16 on a device without a GPU)"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off for the references (the trainer turns it on for CUDA runs in fp32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def conv_layers_at_run_shapes(ctx: DoctorContext, batch: int) -> list[tuple[torch.nn.Conv3d, tuple[int, ...]]]:
    """Each distinct (Conv3d configuration, input shape) of the network's forward at `batch` latents."""
    seen: dict[tuple[Any, ...], tuple[torch.nn.Conv3d, tuple[int, ...]]] = {}

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        shape = tuple(args[0].shape)
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding, shape)
        seen.setdefault(key, (module, shape))

    handles = [m.register_forward_pre_hook(hook) for m in ctx.net.modules() if isinstance(m, torch.nn.Conv3d)]
    try:
        z = ctx.latents(batch)
        t = torch.full((batch,), 0.5, device=ctx.device)
        with torch.no_grad():
            ctx.net(z, t, t / 2)
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


def _conv_error(conv: Conv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **kw: Any) -> float:
    with true_fp32():
        ref = conv(x, w, b, **kw)
    low = conv(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16(), **kw)
    return relative_error(low.float(), ref)


def check_conv3d_bf16(ctx: DoctorContext, conv: Conv = F.conv3d) -> CheckResult:
    """Every convolution of the network at the run's micro-batch shapes, bf16 against fp32 (and #163539's shape on GPUs)."""
    if ctx.dtype is None:
        return CheckResult("conv3d_bf16", None, _NO_AUTOCAST)
    batch = ctx.micro_batch
    worst, where, cases = 0.0, "", []
    g = torch.Generator(ctx.device).manual_seed(1)
    with torch.no_grad():
        for module, shape in conv_layers_at_run_shapes(ctx, batch):
            x = torch.randn(shape, generator=g, device=ctx.device)
            err = _conv_error(
                conv,
                x,
                module.weight,
                module.bias,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
            )
            name = f"{module.in_channels}->{module.out_channels} k{'x'.join(map(str, module.kernel_size))} on {'x'.join(map(str, shape))}"
            cases.append({"conv": name, "relative_error": err})
            if not err <= worst:  # NaN counts as worst
                worst, where = err, name
            del x
        if ctx.device.type == "cuda" and torch.cuda.mem_get_info(ctx.device)[0] > 40 * 2**30:
            x = torch.randn(BUG_163539_SHAPE, generator=g, device=ctx.device)
            w = torch.randn((16, 16, 1, 3, 3), generator=g, device=ctx.device) / 12
            err = _conv_error(conv, x, w, None)
            name = "pytorch#163539 reproduction 16->16 k1x3x3 on " + "x".join(map(str, BUG_163539_SHAPE))
            cases.append({"conv": name, "relative_error": err})
            if not err <= worst:
                worst, where = err, name
            del x
    ctx.free()
    details = {
        "tolerance": CONV_TOLERANCE,
        "cases": cases,
        "cudnn": torch.backends.cudnn.version() if ctx.device.type == "cuda" else None,
    }
    if worst <= CONV_TOLERANCE:
        return CheckResult(
            "conv3d_bf16",
            True,
            f"{len(cases)} convolutions, worst relative error {worst:.2e} (tolerance {CONV_TOLERANCE:.0e})",
            details,
        )
    cudnn = f" (cuDNN {details['cudnn']}; 9.10.2 has this bug: pytorch#163539)" if details["cudnn"] else ""
    return CheckResult(
        "conv3d_bf16",
        False,
        f"bf16 conv3d is wrong{cudnn}: relative error {worst:.3g} > {CONV_TOLERANCE:.0e} "
        f"for {where}; train in fp32 or change the cuDNN/PyTorch build",
        details,
    )


def check_forward_bf16(ctx: DoctorContext) -> CheckResult:
    """The whole network at bf16 autocast against fp32, on two latents."""
    if ctx.dtype is None:
        return CheckResult("forward_bf16", None, _NO_AUTOCAST)
    n = min(ctx.micro_batch, 2)
    z = ctx.latents(n)
    t = torch.tensor([0.7, 0.4][:n], device=ctx.device)
    with torch.no_grad():
        with true_fp32():
            ref = ctx.net(z, t, t / 2)
        with torch.autocast(ctx.device.type, dtype=ctx.dtype):
            low = ctx.net(z, t, t / 2)
    err = relative_error(low.float(), ref)
    ok = err <= FORWARD_TOLERANCE
    return CheckResult(
        "forward_bf16",
        ok,
        f"network output relative error {err:.2e} ({'within' if ok else 'ABOVE'} {FORWARD_TOLERANCE:.0e})",
        {"relative_error": err, "tolerance": FORWARD_TOLERANCE},
    )


def check_jvp(ctx: DoctorContext, du_dt: Callable[..., torch.Tensor] | None = None) -> CheckResult:
    """d/dt u(z_t, t, r) as training computes it (the loss's JVP, the run's precision) against a central
    difference of a float64 copy of the network (step 1e-4: truncation and rounding both ~1e-8)."""
    import copy

    du_dt = du_dt or ctx.loss.du_dt
    n = min(ctx.micro_batch, 2)
    z = ctx.latents(n, seed=2)
    t = torch.tensor([0.7, 0.4][:n], device=ctx.device)
    h = torch.tensor([0.5, 0.3][:n], device=ctx.device)
    with torch.no_grad():
        v = ctx.loss.u(ctx.net, z, t, torch.zeros_like(t))
    got = du_dt(ctx.net, z, t, h, v, ctx.dtype)
    net64 = copy.deepcopy(ctx.net).double()
    eps = 1e-4
    with torch.no_grad(), true_fp32():
        z64, t64, h64, v64 = z.double(), t.double(), h.double(), v.double()
        ahead = ctx.loss.u(net64, z64 + eps * v64, t64 + eps, h64 + eps)
        behind = ctx.loss.u(net64, z64 - eps * v64, t64 - eps, h64 - eps)
    ref = (ahead - behind) / (2 * eps)
    del net64
    ctx.free()
    err = relative_error(got, ref)
    precision = "fp32" if ctx.dtype is None else "bf16"  # what the run computes in on this device
    tol = JVP_TOLERANCE[precision]
    ok = err <= tol
    return CheckResult(
        "jvp",
        ok,
        f"du/dt at {precision} vs a float64 finite difference: relative error "
        f"{err:.2e} ({'within' if ok else 'ABOVE'} {tol:.0e})",
        {"relative_error": err, "tolerance": tol},
    )
