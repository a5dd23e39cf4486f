"""Warm start: initialise the MeanFlow UNet's backbone from NVIDIA's NV-Generate-MR UNet.

The released `diff_unet_3d_rflow-mr.pt` holds `unet_state_dict` (a `DiffusionModelUNetMaisi`
with include_fc = true, include_spacing_input = true, num_class_embeds = 128) and
`scale_factor`. Our backbone is the same UNet without the spacing and class inputs, because a
single-modality, fixed-resolution data set feeds them constants. Those constants are folded
EXACTLY into existing biases, so every key of the file is used and, at h = 0 (and, with the h
MLP at zero, at any h), our network computes what the released one computes for that class and
spacing:

- class: MAISI adds class_embedding[c] to the time embedding's output, so it joins the bias of
  the time MLP's last layer (`time_embed.2.bias`).
- spacing: MAISI concatenates spacing_layer(100 * spacing_mm) to the time embedding; every
  consumer of that vector is a ResBlock's `time_emb_proj(SiLU(emb))`, and SiLU acts per
  element, so W @ SiLU([e_t, e_s]) = W[:, :D] @ SiLU(e_t) + W[:, D:] @ SiLU(e_s): the second
  term is a constant added to the bias and W keeps its first D columns.

Time: MAISI's timesteps are 1000 * t in our convention (same direction: large = noise), so
warm starts need `model.time_scale: 1000` (the run-spec enforces it). MAISI's output is the
velocity x0 - e, not x0: the output head has to re-learn its target during fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuromf.errors import UserError
from neuromf.model.state_fit import load_fitting
from neuromf.model.unet import MeanFlowUNet, zero_h_embedding

__all__ = ["fold_maisi_conditioning", "load_pretrained_backbone"]

log = logging.getLogger(__name__)

# NVIDIA's MAISI code feeds spacing in mm multiplied by 100 (spacing_tensor = spacing * 1e2).
_SPACING_SCALE = 100.0


def fold_maisi_conditioning(
    state: dict[str, torch.Tensor], embed_dim: int, spacing_mm: Sequence[float], class_label: int
) -> dict[str, torch.Tensor]:
    """Fold constant class and spacing inputs of a MAISI UNet state dict into its biases (see module doc)."""
    state = dict(state)
    if "class_embedding.weight" in state:
        table = state.pop("class_embedding.weight")
        if not 0 <= class_label < table.shape[0]:
            raise UserError(
                f"model.init_class_label: {class_label} is outside the checkpoint's {table.shape[0]} classes"
            )
        if "time_embed.2.bias" in state:
            bias = state["time_embed.2.bias"]
            state["time_embed.2.bias"] = (bias.double() + table[class_label].double()).to(bias.dtype)
    spacing_keys = sorted(k for k in state if k.startswith("spacing_layer."))
    if spacing_keys:
        layer = {k: state.pop(k).double() for k in spacing_keys}
        try:
            s = torch.tensor([float(v) * _SPACING_SCALE for v in spacing_mm], dtype=torch.float64)
            hidden = F.silu(F.linear(s, layer["spacing_layer.0.weight"], layer["spacing_layer.0.bias"]))
            spacing_emb = F.linear(hidden, layer["spacing_layer.2.weight"], layer["spacing_layer.2.bias"])
        except (KeyError, RuntimeError) as err:
            raise UserError(
                f"model.init_from: the checkpoint's spacing_layer is not MAISI's 3 -> D -> D MLP ({err})"
            ) from None
        act = F.silu(spacing_emb)
        for key in [k for k in state if k.endswith("time_emb_proj.weight")]:
            weight = state[key]
            if weight.shape[1] != 2 * embed_dim:
                continue  # left as is: the shape check reports it
            bias_key = key[: -len("weight")] + "bias"
            bias = state[bias_key]
            state[bias_key] = (bias.double() + weight[:, embed_dim:].double() @ act).to(bias.dtype)
            state[key] = weight[:, :embed_dim].contiguous()
    return state


def load_pretrained_backbone(
    net: MeanFlowUNet,
    path: str | Path,
    *,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    class_label: int = 9,
) -> None:
    """Load NV-Generate-MR's `unet_state_dict` from `path` into `net.unet`; the h MLP is reset to zero.

    `class_label` is the MAISI modality class (9 = mri_t1 in NVIDIA's modality_mapping.json) and
    `spacing_mm` the voxel spacing of the decoded volumes; both are folded into biases. Any key
    mismatch (wrong `model.*` architecture) is a UserError listing the offending keys.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.init_from: {path} does not exist or is not a file")
    try:
        # weights_only=False: NVIDIA's file pickles `scale_factor` as a MONAI MetaTensor whose
        # metadata holds MONAI objects (e.g. TraceKeys enums) that the weights-only unpickler
        # refuses (MONAI allow-lists only the MetaTensor class itself), as NVIDIA's own loaders
        # also pass weights_only=False. Full unpickling can run code from the file: init_from
        # must name a checkpoint you trust.
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(
            f"model.init_from: {path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("unet_state_dict"), dict):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"model.init_from: {path} has no 'unet_state_dict' (found {found})")
    if "scale_factor" in ckpt:
        log.info("warm start from %s (scale_factor %s)", path, float(torch.as_tensor(ckpt["scale_factor"]).float()))

    embed_dim = net.unet.time_embed[0].out_features
    state = fold_maisi_conditioning(
        {k: torch.as_tensor(v) for k, v in ckpt["unet_state_dict"].items()}, embed_dim, spacing_mm, class_label
    )
    load_fitting(
        net.unet,
        state,
        f"model.init_from: {path}",
        "the network that model.* describes",
        hint="NV-Generate-MR has channels [64, 128, 256, 512], attention [false, false, true, true], num_head_channels "
        "[0, 0, 32, 32], num_res_blocks 2, norm_num_groups 32, resblock_updown true, in/out channels 4",
    )
    zero_h_embedding(net)
