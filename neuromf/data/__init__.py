"""Latent data: reading .pt files, packing HDF5 shards, the train/val split, the batches the trainer draws (prepare.py)."""
