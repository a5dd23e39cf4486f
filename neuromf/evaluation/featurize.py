"""From a batch of latents to feature rows: the space (decoded image or latent) and the feature extractor.

`open_featurizer` loads what a comparison needs once (the extractor's weights, and in image space the
run-spec's VAE) and frees it afterwards. In image space with the identity decoder (the demo) the image is
channel 0 of the de-normalised latent, the T1 volume, as the sample previews show it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuromf.errors import UserError
from neuromf.evaluation.features import DEFAULT_FEATURES, FeatureSpec, latent_features
from neuromf.spec.schema import RunSpec

__all__ = ["Featurizer", "open_featurizer", "held_out_split", "COMPARABLE"]

# Which feature spaces give numbers a paper can set beside published ones.
COMPARABLE = {"pooled": False, "medicalnet3d": True, "radimagenet2p5d": True}


def held_out_split(data: Any) -> str:
    """The reference split of an evaluation: the held-out test subjects when the data has at least 2 of their
    latents, else validation (which also chose best.pt, so it is not held out from checkpoint selection)."""
    return "test" if len(getattr(data, "test_names", None) or []) >= 2 or not data.val_names else "val"


@dataclass
class Featurizer:
    spec: RunSpec
    kind: str  # pooled | medicalnet3d | radimagenet2p5d
    space: str  # image | latent
    device: torch.device
    extractor: Any = None  # extractors.Extractor
    vae: nn.Module | None = None
    pooled: FeatureSpec = field(default_factory=lambda: DEFAULT_FEATURES)

    def images(self, normalised: Tensor, raw: Tensor) -> Tensor:
        """The volumes compared: latents (normalised) in latent space, else decoded (B, 1, X, Y, Z) on the CPU."""
        if self.space == "latent":
            return normalised.detach().float().cpu()
        if self.spec.vae.decoder == "identity":
            return raw[:, :1].detach().float().cpu()
        from neuromf.device import autocast_dtype
        from neuromf.model.vae import decode_with

        return decode_with(self.vae, raw, self.spec.vae, autocast_dtype(self.spec, self.device))

    def features(self, volumes: Tensor) -> dict[str, Tensor]:
        """{plane: (rows, F) float64}: one row per volume ('pooled', '3d') or per slice ('xy', 'yz', 'zx')."""
        if self.kind == "pooled":
            return {"pooled": latent_features(volumes, self.pooled)}
        from neuromf.evaluation.image_features import features_fn

        return features_fn(self.kind, self.extractor.net)(volumes)

    def info(self) -> dict[str, Any]:
        e = self.extractor
        return {
            "features": self.kind,
            "space": self.space,
            "weights": str(Path(e.path).resolve()) if e else None,
            "weights_sha256": e.sha256 if e else None,
            "description": e.description if e else self.pooled.describe(),
            "comparable_with_literature": COMPARABLE[self.kind],
        }


@contextmanager
def open_featurizer(
    spec: RunSpec, kind: str, weights: Path | None, space: str, device: torch.device
) -> Iterator[Featurizer]:
    """`with open_featurizer(...) as f:` the extractor and (image space, MAISI decoder) the VAE, freed on exit."""
    from neuromf.evaluation.extractors import load_extractor

    if kind not in COMPARABLE:
        raise UserError(f"--features {kind}: expected one of {', '.join(COMPARABLE)}")
    if space not in ("image", "latent"):
        raise UserError(f"--space {space}: expected image or latent")
    if kind != "pooled" and space == "latent":
        raise UserError(f"--space latent: {kind} works on decoded images; use --space image (or --features pooled)")
    if kind != "pooled" and weights is None:
        raise UserError(f"--weights: required with --features {kind} (stage the file yourself: nothing is downloaded)")
    extractor = load_extractor(kind, Path(weights), device) if kind != "pooled" else None  # type: ignore[arg-type]
    featurizer = Featurizer(spec, kind, space, device, extractor)
    try:
        if space == "image" and spec.vae.decoder != "identity":
            from neuromf.model.vae import loaded_vae

            with loaded_vae(spec.vae, spec.paths.vae_weights, device) as vae:
                featurizer.vae = vae
                yield featurizer
                featurizer.vae = None
        else:
            yield featurizer
    finally:
        del featurizer.extractor, extractor
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
