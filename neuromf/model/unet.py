"""The MeanFlow network: MONAI's MAISI 3D diffusion UNet conditioned on t and h = t - r.

`MeanFlowUNet.forward(x, t, h)` embeds t and h with the same sinusoid + MLP form
MONAI uses for its time embedding and ADDS the two embeddings; the UNet body
(ResBlocks, attention, up/down sampling) is MONAI's `DiffusionModelUNetMaisi`,
run block by block through its own helpers.

Choices (docs/design.md, 'The network' and 'Decisions'):
- time scale: t and h are multiplied by `spec.time_scale` before the sinusoid.
  1.0 (raw t in [0, 1], as the official MeanFlow code) is the default: with
  1000 (MAISI's 0..1000 timesteps, needed to reuse NV-Generate-MR weights) the
  d/dt part of the JVP is ~100x the d/dz part at init.
- the h MLP's last layer starts at zero, so a fresh (or warm-started) network's
  output does not depend on h: at h = 0 it equals the backbone's exactly.
- every GroupNorm is a `Fp32GroupNorm`: plain ops in fp32 under compile or autocast.
  `torch.compile` of a function that calls `torch.func.jvp` fails on `nn.GroupNorm`,
  and so does bf16 autocast + JVP on CPU; plain ops have forward-mode rules everywhere.
  Eager fp32 keeps PyTorch's fused kernel (faster). Same parameter names, so state
  dicts stay compatible with MONAI's.
- attention runs through `F.scaled_dot_product_attention`, which picks a fused
  kernel where one exists (fast gradient pass, sampling). The fused kernels
  have no forward-mode derivative: code that takes a JVP must wrap it in
  `math_attention()` (the loss does).
- attention blocks keep their output projection (MONAI's include_fc = True):
  that is the NV-Generate-MR layout and gives the reference ~178.6 M parameters.
- activation checkpointing (`set_gradient_checkpointing`): each UNet block under
  torch.utils.checkpoint while autograd records, i.e. in the gradient passes only; the
  loss's no-grad JVP never checkpoints (inside a graph-building JVP it would fail).
- dropout: MONAI's MAISI UNet only offers dropout on cross-attention layers
  (`dropout_cattn`), which an unconditional UNet does not have, so
  `model.dropout` must stay 0 (a non-zero value is refused here).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.blocks.selfattention import SABlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from neuromf.errors import UserError
from neuromf.spec.schema import ModelSpec

__all__ = [
    "Fp32GroupNorm",
    "MeanFlowUNet",
    "build_network",
    "count_parameters",
    "math_attention",
    "perturb_zero_init",
    "set_gradient_checkpointing",
    "timestep_embedding",
]


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (fp64 for fp64 input), returned in the input's dtype.

    Drop-in for nn.GroupNorm (same parameters and names). Under torch.compile or autocast it is
    written in plain tensor ops: their forward-mode AD rules survive both, where the fused kernel's
    do not. Eager fp32/fp64 input takes the fused kernel (the same maths to ~1e-6): the CPU demo's
    gradient pass is ~13 % faster with it, its whole step ~7 % (docs/benchmarks.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()
        ):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        b, c = x.shape[:2]
        xg = x.to(dtype).reshape(b, self.num_groups, -1)
        mean = xg.mean(dim=-1, keepdim=True)
        centred = xg - mean
        var = (centred * centred).mean(dim=-1, keepdim=True)
        y = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.to(dtype).reshape(shape) + self.bias.to(dtype).reshape(shape)
        return y.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float times (B,) -> (B, dim), identical to MONAI's `get_timestep_embedding`.

    MONAI's version casts t to float32; this one computes in float64 when t is float64, so the
    fp64 finite-difference checks of d/dt are tight. In float32 the two agree bit for bit.
    """
    if t.ndim != 1:
        raise ValueError(f"times must have shape (B,), got {tuple(t.shape)}")
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half).to(dtype)
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class MeanFlowUNet(nn.Module):
    """u/x network for MeanFlow: `forward(x, t, h)` with t, h float tensors (B,) in [0, 1]."""

    # Activation checkpointing of each UNet block, only while autograd records (the gradient
    # passes): the loss's JVP runs under no_grad, where checkpointing is off (inside a
    # grad-enabled JVP it would raise CheckpointError). Set by set_gradient_checkpointing().
    gradient_checkpointing: bool = False

    def __init__(self, unet: DiffusionModelUNetMaisi, time_scale: float = 1.0) -> None:
        super().__init__()
        if unet.num_class_embeds is not None or unet.include_spacing_input:
            raise ValueError("MeanFlowUNet needs an unconditional MAISI UNet (no class or spacing input)")
        self.unet = unet
        self.time_scale = float(time_scale)
        self.embed_channels = unet.block_out_channels[0]
        time_embed_dim = unet.time_embed[0].out_features
        # Same form as MONAI's time embedding (Linear, SiLU, Linear); built by MONAI's own helper.
        self.h_embed = unet._create_embedding_module(self.embed_channels, time_embed_dim)
        zero_h_embedding(self)

    def embedding(self, t: torch.Tensor, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """emb(t) + emb_h(h): the vector every ResBlock's time_emb_proj sees."""
        t_emb = timestep_embedding(t * self.time_scale, self.embed_channels).to(dtype)
        h_emb = timestep_embedding(h * self.time_scale, self.embed_channels).to(dtype)
        return self.unet.time_embed(t_emb) + self.h_embed(h_emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if t.shape != (x.shape[0],) or h.shape != (x.shape[0],):
            raise ValueError(f"t and h must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(h.shape)}")
        unet = self.unet
        emb = self.embedding(t, h, x.dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return _checkpointed_body(unet, x, emb)
        # MONAI's forward minus its own time embedding (it has no slot for a second one).
        y = unet.conv_in(x)
        y, skips = unet._apply_down_blocks(y, emb, None, None)
        y = unet.middle_block(y, emb, None)
        y = unet._apply_up_blocks(y, emb, None, skips)
        return unet.out(y)


def _checkpointed_body(unet: DiffusionModelUNetMaisi, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """MeanFlowUNet.forward's body with every down, middle and up block under non-reentrant checkpointing.

    Same blocks in the same order as MONAI's _apply_down_blocks / _apply_up_blocks (without their
    ControlNet residuals): only block inputs and outputs stay alive; the insides are recomputed
    in backward.
    """
    y = unet.conv_in(x)
    skips: list[torch.Tensor] = [y]
    for block in unet.down_blocks:
        y, res = checkpoint(block, hidden_states=y, temb=emb, context=None, use_reentrant=False)
        skips.extend(res)
    y = checkpoint(unet.middle_block, hidden_states=y, temb=emb, context=None, use_reentrant=False)
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        y = checkpoint(block, hidden_states=y, res_hidden_states_list=res, temb=emb, context=None, use_reentrant=False)
    return unet.out(y)


def set_gradient_checkpointing(net: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of the gradient passes on or off (training.gradient_checkpointing)."""
    target = getattr(net, "module", net)  # a DDP wrapper holds the MeanFlowUNet as .module
    if not isinstance(target, MeanFlowUNet):
        raise TypeError(f"gradient checkpointing needs a MeanFlowUNet, got {type(target).__name__}")
    target.gradient_checkpointing = bool(enabled)


def zero_h_embedding(net: MeanFlowUNet) -> None:
    """Zero the h MLP's last layer: the output then ignores h (warm start keeps the backbone's output)."""
    last = net.h_embed[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def _use_fp32_groupnorm(module: nn.Module) -> None:
    """Turn every nn.GroupNorm into a Fp32GroupNorm in place (same parameters, works on meta tensors)."""
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = Fp32GroupNorm


def _use_sdpa_attention(module: nn.Module) -> None:
    """Route MONAI's self-attention through F.scaled_dot_product_attention.

    MONAI refuses `use_flash_attention=True` at construction without CUDA (and on meta), but the
    flag is only read in forward, where it selects SDPA instead of the einsum path.
    """
    for m in module.modules():
        if isinstance(m, SABlock):
            m.use_flash_attention = True


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Restrict SDPA to its math backend: the only one with forward-mode AD (needed inside a JVP)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def build_network(spec: ModelSpec) -> MeanFlowUNet:
    """Build the MeanFlow UNet that `spec` describes (works under `with torch.device("meta")`)."""
    if spec.dropout != 0.0:
        raise UserError(
            f"model.dropout: {spec.dropout} is not supported: MONAI's MAISI UNet has dropout only on "
            "cross-attention layers, which this unconditional network does not have; set it to 0"
        )
    unet = DiffusionModelUNetMaisi(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        num_res_blocks=spec.num_res_blocks,
        num_channels=list(spec.channels),
        attention_levels=list(spec.attention_levels),
        norm_num_groups=spec.norm_num_groups,
        resblock_updown=spec.resblock_updown,
        num_head_channels=list(spec.num_head_channels),
        include_fc=True,
        use_flash_attention=False,
    )
    _use_fp32_groupnorm(unet)
    _use_sdpa_attention(unet)
    return MeanFlowUNet(unet, time_scale=spec.time_scale)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters (works on meta tensors)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def perturb_zero_init(net: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Give every all-zero weight/bias small random values (for tests and diagnostics only).

    MONAI zero-initialises each ResBlock's second conv, the attention output convs and the output
    conv (and this module the h MLP's last layer): a fresh network outputs 0 and all its
    derivatives vanish, which makes tests of derivatives or of h-dependence vacuous.
    """
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() and not bool(p.detach().abs().sum()):
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32, device="cpu")
                p.copy_((noise * std).to(p))
