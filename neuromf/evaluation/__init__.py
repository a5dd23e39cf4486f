"""Judging a trained model: samples from a checkpoint, FD/MMD against held-out latents, the P4-T1..T8 report.

- features.py  the weight-free feature space (pooled per-channel statistics of latents) and why
- metrics.py   Fréchet distance, RBF-kernel MMD², per-channel moments, histogram overlap, diversity
- runs.py      finding and loading a run's checkpoint, its run-spec, networks and normalisation statistics
- generate.py  per-sample fixed noise and batched generation
- sampling.py  `neuromf sample`: latents, NIfTI volumes and PNG grids
- evaluate.py  `neuromf evaluate`: EMA vs online, each NFE
- checks.py    P4-T1..T8 as functions; report.py: `neuromf verify` (Markdown, JSON, loss curve)
- plots.py     Pillow-drawn charts (no matplotlib dependency)
"""
