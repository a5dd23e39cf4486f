"""The iMF method: (t, r) sampling, the exact-JVP MeanFlow loss, and one- and multi-step samplers."""
