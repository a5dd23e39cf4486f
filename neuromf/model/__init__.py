"""Networks: the MAISI UNet with an h embedding (the MeanFlow model) and the frozen MAISI VAE that decodes samples."""
