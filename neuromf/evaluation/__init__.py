"""Judging a trained model: samples from a checkpoint, FID/MMD/MS-SSIM against held-out data, the report of the
verification tests P4-T1..P4-T8 (docs/design.md, 'Verification tests').

- features.py        the weight-free feature space (pooled per-channel statistics of latents) and why
- extractors.py      published extractors (MedicalNet 3D via MONAI's ResNet, RadImageNet ResNet50), loaded from staged files
- image_features.py  each extractor's preprocessing and feature vectors (3D per volume, 2.5D per slice and plane)
- featurize.py       latent or image space (VAE decode) + extractor, loaded once per comparison; the reference split
- sets.py            what is gathered per set of samples (Gaussian fits, per-volume vectors, moments, volumes)
- metrics.py         Fréchet distance, RBF-kernel MMD², MS-SSIM diversity, per-channel moments, histogram overlap
- runs.py            finding and loading a run's checkpoint, its run-spec, networks and normalisation statistics
- generate.py        per-sample fixed noise and batched generation
- sampling.py        `neuromf sample`: latents, NIfTI volumes and PNG grids
- evaluate.py        `neuromf evaluate`: EMA vs online, each NFE
- wandb_summary.py   an evaluation's numbers into the run's wandb summary
- checks.py          P4-T1..T8 as functions; report.py: `neuromf verify` (Markdown, JSON, loss curve)
- plots.py           Pillow-drawn charts (no matplotlib dependency)
"""
