"""The MeanFlow UNet: MONAI's MAISI backbone, the added h embedding, fp32 GroupNorm, attention paths, meta build."""

from __future__ import annotations

import pytest
import torch
from imf_tiny import TINY, tiny_net, tiny_spec
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from neuromf.errors import UserError
from neuromf.model.unet import (
    Fp32GroupNorm,
    build_network,
    count_parameters,
    math_attention,
    perturb_zero_init,
    timestep_embedding,
)
from neuromf.spec.schema import ModelSpec

X_SHAPE = (2, 4, 16, 16, 16)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(X_SHAPE, generator=g), torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.5])


def test_forward_shape_and_input_checks() -> None:
    net = tiny_net()
    x, t, h = _inputs()
    y = net(x, t, h)
    assert y.shape == x.shape and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    with pytest.raises(ValueError, match="t and h must have shape"):
        net(x, t[:1], h)


def test_fresh_network_ignores_h_and_equals_monai_forward() -> None:
    """With the h MLP's last layer at zero the output is MONAI's own forward (for any h)."""
    net = tiny_net(perturb=False)
    assert not bool(net.h_embed[-1].weight.abs().sum())  # zero-initialised
    with torch.no_grad():  # make the backbone non-trivial but keep the h MLP at zero
        last = net.h_embed[-1]
        perturb_zero_init(net.unet, std=0.05, generator=torch.Generator().manual_seed(1))
        assert not bool(last.weight.abs().sum())
    x, t, h = _inputs()
    with torch.no_grad():
        ours = net(x, t, h)
        ours_h0 = net(x, t, torch.zeros(2))
        monai = net.unet(x, timesteps=t * net.time_scale)
    assert ours.abs().mean() > 1e-3
    assert torch.equal(ours, ours_h0)
    assert torch.allclose(ours, monai, rtol=0, atol=1e-6)


def test_output_depends_on_t_and_h_once_trained() -> None:
    net = tiny_net()  # every zero-initialised layer perturbed, the h MLP included
    x, t, h = _inputs()
    with torch.no_grad():
        base = net(x, t, h)
        assert (net(x, t, h + 0.2) - base).abs().max() > 1e-4
        assert (net(x, t + 0.2, h) - base).abs().max() > 1e-4


def test_time_embedding_matches_monai_and_is_differentiable() -> None:
    t = torch.rand(7) * 1000
    assert torch.equal(timestep_embedding(t, 64), get_timestep_embedding(t, 64))
    assert torch.equal(timestep_embedding(t, 63), get_timestep_embedding(t, 63))
    t64 = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert timestep_embedding(t64, 16).dtype == torch.float64  # keeps fp64 for finite-difference checks
    assert torch.autograd.gradcheck(lambda s: timestep_embedding(s * 10, 16), (t64,))
    # MONAI's own version is differentiable too (but computes in fp32)
    tm = torch.rand(3, requires_grad=True)
    get_timestep_embedding(tm, 16).sum().backward()
    assert tm.grad is not None and bool(tm.grad.abs().sum() > 0)


def test_groupnorm_is_fp32_with_monai_parameter_names() -> None:
    net = tiny_net()
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is Fp32GroupNorm for m in norms)
    assert not any(getattr(m, "inplace", False) for m in net.modules())  # no SiLU(inplace) on the JVP path
    plain = DiffusionModelUNetMaisi(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        num_res_blocks=1,
        num_channels=TINY["channels"],
        attention_levels=TINY["attention_levels"],
        num_head_channels=TINY["num_head_channels"],
        norm_num_groups=4,
        resblock_updown=True,
        include_fc=True,
    )
    assert list(net.unet.state_dict()) == list(plain.state_dict())
    ref = nn.GroupNorm(4, 16, eps=1e-6)
    ours = Fp32GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16, 5, 4, 3) * 3 + 1
    assert torch.allclose(ours(x), ref(x), atol=1e-5)  # eager fp32: the fused kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the plain ops, still in fp32
        under_autocast = ours(x)
    assert under_autocast.dtype == torch.float32 and torch.allclose(under_autocast, ref(x), atol=1e-5)
    assert not torch.equal(under_autocast, ours(x))  # two implementations (equal to rounding), not one
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref(x.bfloat16().float()), atol=3e-2)


def test_attention_runs_through_sdpa_and_matches_einsum() -> None:
    net = tiny_net()
    blocks = [m for m in net.modules() if isinstance(m, SABlock)]
    assert blocks and all(b.use_flash_attention for b in blocks)
    x, t, h = _inputs()
    with torch.no_grad():
        sdpa = net(x, t, h)
        for b in blocks:
            b.use_flash_attention = False  # MONAI's einsum path
        einsum = net(x, t, h)
        for b in blocks:
            b.use_flash_attention = True
    assert torch.allclose(sdpa, einsum, atol=1e-5)


def test_jvp_needs_math_attention_and_works_under_bf16_autocast() -> None:
    """CPU's fused SDPA kernel has no forward AD; math_attention() routes around it, also under bf16."""
    net = tiny_net()
    x, t, h = _inputs()
    tangents = (torch.ones_like(x), torch.ones(2), torch.ones(2))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(net, (x, t, h), tangents)
    with torch.no_grad(), math_attention():
        y, dy = torch.func.jvp(net, (x, t, h), tangents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb, dyb = torch.func.jvp(net, (x, t, h), tangents)
    assert bool(torch.isfinite(dy).all()) and dy.abs().mean() > 1e-4
    assert bool(torch.isfinite(dyb.float()).all())
    assert float((dyb.float() - dy).norm() / dy.norm()) < 0.1


def test_meta_build_and_parameter_counts() -> None:
    with torch.device("meta"):
        meta = build_network(tiny_spec())
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert count_parameters(meta) == count_parameters(tiny_net(perturb=False))
    with torch.device("meta"):
        production = build_network(ModelSpec())  # channels [64, 128, 256, 512], 2 res blocks
    # MONAI's backbone (include_fc) 178,566,276 + the h MLP (64*256 + 256 + 256*256 + 256)
    assert count_parameters(production.unet) == 178_566_276
    assert count_parameters(production) == 178_566_276 + 82_432


def test_dropout_is_refused() -> None:
    with pytest.raises(UserError, match="model.dropout"):
        build_network(tiny_spec(dropout=0.1))


@pytest.mark.parametrize("groups", [8, 4])
def test_groupnorm_with_one_channel_per_group_removes_the_time_conditioning(groups: int) -> None:
    """Why model.norm_num_groups must be below every level's channels (the spec refuses 8 groups for 8 channels).

    A ResBlock adds the t/h embedding as a per-channel bias before its second GroupNorm. The first level's first
    block sees only x, so its output changes with t exactly when the normalisation keeps part of that bias.
    """
    spec = tiny_spec().model_copy(update={"norm_num_groups": groups})  # model_copy skips the spec's refusal
    torch.manual_seed(0)
    net = build_network(spec)
    perturb_zero_init(net, std=0.05, generator=torch.Generator().manual_seed(1))
    outputs = []
    net.unet.down_blocks[0].resnets[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in (0.2, 0.9):
            net(x, torch.tensor([t]), torch.tensor([0.1]))
    change = float((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max())
    if groups == spec.channels[0]:
        assert change < 1e-5  # rounding only: t and h are gone
    else:
        assert change > 1e-3
