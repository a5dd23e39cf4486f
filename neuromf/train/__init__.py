"""Training: the loop, EMA, checkpoints, logging and periodic samples."""
