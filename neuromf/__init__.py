"""NeuroMF: a containerised trainer for one-step latent MeanFlow (iMF) models of 3D brain MRI."""

__version__ = "0.1.0"
