"""The derived seeds: pinned to the values of the four hand-written derivations they replaced.

The data order, the loss noise, validation noise, sample noise and the subject split of existing
runs depend on these exact numbers (exact resume, unchanged splits, comparable samples).
"""

from __future__ import annotations

import torch

from neuromf.seeding import derived_fraction, derived_generator, derived_seed
from neuromf.train.loop import chunk_generator


def test_derived_seeds_are_those_of_the_old_derivations() -> None:
    # data/batches.py: the epoch permutation ("perm", seed, epoch) and the flips ("flip", seed, epoch, position)
    assert derived_seed("perm", 0, 3) == 7378092031436325066
    assert derived_seed("flip", 42, 1, 7) == 7875734494828714401
    # evaluation/generate.py: sample k's noise, formerly sha256(f"neuromf-sample:{seed}:{k}")
    assert derived_seed("neuromf-sample", 0, 5) == 7475455029068128179
    assert derived_seed("neuromf-sample", 1234, 0) == 4836455186887721760
    # the trainer: chunk 1 of step 3 with training.seed 42, and validation batch 0
    g = chunk_generator(42, 3, 1, torch.device("cpu"))
    assert g.initial_seed() == 2228731755510534442
    assert torch.rand(2, generator=g).tolist() == [0.5739525556564331, 0.6360766887664795]
    assert derived_generator(torch.device("cpu"), "val", 42, 0).initial_seed() == 6752695442195645845


def test_derived_fraction_is_the_split_draw_of_before() -> None:
    # data/split.py: a subject's draw, formerly sha256(f"{seed}:{key}") big-endian / 2**64
    assert derived_fraction(42, "OASIS-1/OAS1_0001") == 0.9954962418843109
    assert derived_fraction(0, "IXI/IXI002") == 0.6422950083849706
    assert all(0 <= derived_fraction(0, f"d/s{i}") < 1 for i in range(100))
