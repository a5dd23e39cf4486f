"""The train/val split: disjoint, complete, deterministic across processes, independent of listing order."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from neuromf.data.split import split_names, split_sizes

NAMES = [f"sub-{i:04d}_ses-{i % 3}" for i in range(1100)]


def test_disjoint_complete_and_sized() -> None:
    train, val = split_names(NAMES, 0.10, 42)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(NAMES)
    assert (len(train), len(val)) == split_sizes(len(NAMES), 0.10) == (990, 110)
    assert train == sorted(train) and val == sorted(val)


def test_independent_of_listing_order() -> None:
    reference = split_names(NAMES, 0.10, 42)
    for seed in range(3):
        shuffled = NAMES[:]
        random.Random(seed).shuffle(shuffled)
        assert split_names(shuffled, 0.10, 42) == reference
    assert split_names(list(reversed(NAMES)), 0.10, 42) == reference


def test_seed_matters() -> None:
    assert split_names(NAMES, 0.10, 42)[1] != split_names(NAMES, 0.10, 43)[1]


def test_same_split_in_other_processes_and_hash_seeds() -> None:
    code = "import json, sys; from neuromf.data.split import split_names; " \
           "print(json.dumps(split_names(json.load(sys.stdin), 0.1, 42)))"
    results = []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(NAMES[::-1]), capture_output=True,
                              text=True, env=env, timeout=60, check=True)
        results.append(json.loads(proc.stdout))
    assert results[0] == results[1] == [list(part) for part in split_names(NAMES, 0.10, 42)]


def test_known_split_never_changes() -> None:
    # Golden values: changing the algorithm would silently move latents between train and val of old runs.
    names = [f"sub-{i:03d}" for i in range(20)]
    assert split_names(names, 0.10, 42)[1] == ["sub-009", "sub-019"]
    assert split_names(names, 0.10, 7)[1] == ["sub-016", "sub-019"]


def test_edge_cases() -> None:
    assert split_names([], 0.1) == ([], [])
    assert split_names(["a"], 0.1) == (["a"], [])
    assert split_names(["a", "b"], 0.0) == (["a", "b"], [])
    assert len(split_names(["a", "b"], 0.1)[1]) == 1  # at least one held out when asked for
    assert split_sizes(10, 0.999) == (1, 9)  # never empties the training set
    with pytest.raises(ValueError, match="unique"):
        split_names(["a", "a", "b"], 0.1)
