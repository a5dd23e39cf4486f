"""The iMF method: (t, r) sampling, the exact-JVP MeanFlow loss, and the one- and multi-step sampler."""
