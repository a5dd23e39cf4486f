"""The subject-level split: no subject in two splits, stratified by dataset, deterministic, stable under addition."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _latent_data import longitudinal_metas, write_longitudinal

from neuromf.data.meta import LatentMeta, subject_keys
from neuromf.data.scan import scan_latents
from neuromf.data.split import MIN_STRATIFIED, SPLITS, split_subjects

# Three datasets of different sizes (the smallest just at the stratification threshold), 1-4 sessions per subject.
DATASETS = {"PT001_OASIS1": 120, "PT002_OASIS2": 60, "PT005_IXI": 40, "PT009_TINY": MIN_STRATIFIED, "PT010_FEW": 4}
METAS = longitudinal_metas(DATASETS)


def _check_split(split, metas: list[LatentMeta]) -> None:
    assert sorted(split.train + split.val + split.test) == sorted(m.name for m in metas)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert split.subjects(a).isdisjoint(split.subjects(b)), (a, b)  # zero subjects shared
    by = split.by_dataset()
    for dataset, n in DATASETS.items():
        if n >= MIN_STRATIFIED:
            assert by[dataset]["val"]["subjects"] >= 1 and by[dataset]["test"]["subjects"] >= 1, (dataset, by[dataset])


@pytest.mark.parametrize("seed", [0, 1, 2, 42, 1234])
def test_no_shared_subjects_and_every_dataset_in_val_and_test(seed: int) -> None:
    split = split_subjects(METAS, 0.10, 0.05, seed)
    _check_split(split, METAS)
    n_subjects = sum(DATASETS.values())
    assert 0.04 < len(split.subjects("val")) / n_subjects < 0.18 and len(split.subjects("test")) >= 4


def test_sessions_of_a_subject_stay_together_and_subject_ids_are_per_dataset() -> None:
    split = split_subjects(METAS, 0.10, 0.05, 42)
    place = {n: w for w in SPLITS for n in split.names(w)}
    by_subject: dict[tuple[str, str], set[str]] = {}
    for m in METAS:
        by_subject.setdefault((m.dataset, m.subject), set()).add(place[m.name])
    assert all(len(places) == 1 for places in by_subject.values())
    assert len(set(split.subject_of.values())) == sum(DATASETS.values())  # sub_000 of OASIS1 is not sub_000 of IXI


def test_independent_of_listing_order_and_of_metadata_vs_names() -> None:
    reference = split_subjects(METAS, 0.10, 0.05, 42)
    for seed in range(3):
        shuffled = METAS[:]
        random.Random(seed).shuffle(shuffled)
        again = split_subjects(shuffled, 0.10, 0.05, 42)
        assert (again.train, again.val, again.test) == (reference.train, reference.val, reference.test)
    parsed = split_subjects([LatentMeta(m.name) for m in METAS], 0.10, 0.05, 42)  # no metadata: FOMO names parsed
    assert (parsed.train, parsed.val, parsed.test) == (reference.train, reference.val, reference.test)
    assert parsed.unmatched == 0


def test_adding_subjects_never_moves_existing_ones() -> None:
    base = split_subjects(METAS, 0.10, 0.05, 42)
    assert base.promoted == []  # the premise: every dataset's own draw filled val and test
    grown = METAS + longitudinal_metas({**DATASETS, "PT020_NEW": 30}, seed=9, first_subject=500)
    after = split_subjects(grown, 0.10, 0.05, 42)
    before_place = {n: w for w in SPLITS for n in base.names(w)}
    after_place = {n: w for w in SPLITS for n in after.names(w)}
    assert {n: after_place[n] for n in before_place} == before_place
    # and in another order, with sessions added to existing subjects too
    more_sessions = [LatentMeta(f"{m.dataset}_{m.subject}_ses_9", m.subject, "ses_9", m.dataset) for m in METAS[::7]]
    again = split_subjects(list(reversed(grown + more_sessions)), 0.10, 0.05, 42)
    assert all(n in again.names(before_place[n]) for n in before_place)
    for m in more_sessions:  # a new session goes where its subject is
        old = next(x.name for x in METAS if (x.dataset, x.subject) == (m.dataset, m.subject))
        assert m.name in again.names(before_place[old])


def test_promotion_guarantees_small_datasets_and_is_the_only_thing_that_can_move() -> None:
    """A dataset of 10 subjects whose draw gives no val or test subject gets the nearest ones promoted; such a
    promoted subject is the only kind that can move when subjects are added (listed in split.json)."""
    promoted_any = False
    for seed in range(40):
        base_metas = longitudinal_metas({"DS_A": MIN_STRATIFIED}, seed=seed)
        base = split_subjects(base_metas, 0.10, 0.05, seed)
        assert base.subjects("val") and base.subjects("test")
        promoted_any |= bool(base.promoted)
        grown = split_subjects(
            base_metas + longitudinal_metas({"DS_A": 30}, seed=seed, first_subject=100), 0.10, 0.05, seed
        )
        promoted_keys = {p.split(" -> ")[0] for p in base.promoted}
        for w in SPLITS:
            for n in base.names(w):
                if n not in grown.names(w):
                    assert base.subject_of[n] in promoted_keys, (seed, n)
    assert promoted_any  # the case was exercised


def test_same_split_in_other_processes_and_hash_seeds() -> None:
    code = (
        "import json, sys; from neuromf.data.meta import LatentMeta; from neuromf.data.split import split_subjects; "
        "s = split_subjects([LatentMeta(*m) for m in json.load(sys.stdin)], 0.1, 0.05, 42); "
        "print(json.dumps([s.train, s.val, s.test]))"
    )
    payload = json.dumps([[m.name, m.subject, m.session, m.dataset] for m in reversed(METAS)])
    results = []
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(
            [sys.executable, "-c", code], input=payload, capture_output=True, text=True, env=env, timeout=60, check=True
        )
        results.append(json.loads(proc.stdout))
    split = split_subjects(METAS, 0.10, 0.05, 42)
    assert results[0] == results[1] == [split.train, split.val, split.test]


def test_known_split_never_changes() -> None:
    # Golden values: changing the algorithm would silently move subjects between the splits of old runs.
    metas = [LatentMeta(f"DS_sub_{i:03d}_ses_1") for i in range(20)]
    split = split_subjects(metas, 0.10, 0.05, 42)
    assert (split.val, split.test) == (GOLDEN_VAL, GOLDEN_TEST)


GOLDEN_VAL = ["DS_sub_007_ses_1", "DS_sub_009_ses_1"]
GOLDEN_TEST = ["DS_sub_008_ses_1", "DS_sub_015_ses_1"]


def test_subject_from_a_pattern_and_unmatched_names() -> None:
    metas = [LatentMeta(f"scan-{s}-{v}") for s in range(30) for v in range(2)] + [LatentMeta("odd_one")]
    keys = subject_keys(metas, r"^scan-(?P<subject>\d+)-")
    assert keys.unmatched == 1 and keys.keys["scan-3-0"] == keys.keys["scan-3-1"] and keys.keys["odd_one"] == "/odd_one"
    split = split_subjects(metas, 0.2, 0.1, 0, r"^scan-(?P<subject>\d+)-")
    assert split.unmatched == 1
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert split.subjects(a).isdisjoint(split.subjects(b))
    # metadata wins over the name with 'metadata'; a pattern ignores the metadata's subject
    m = [LatentMeta(f"x{i}", subject=f"S{i // 2}", dataset="D") for i in range(4)]
    assert subject_keys(m).keys["x0"] == subject_keys(m).keys["x1"] == "D/S0"
    assert subject_keys(m, r"^(?P<subject>x\d)$").keys["x0"] == "D/x0"


def test_edge_cases() -> None:
    empty = split_subjects([], 0.1, 0.05)
    assert (empty.train, empty.val, empty.test) == ([], [], [])
    one = split_subjects([LatentMeta("a")], 0.1, 0.05, 1)
    assert len(one.train + one.val + one.test) == 1
    none_held = split_subjects([LatentMeta(f"n{i}") for i in range(30)], 0.0, 0.0)
    assert len(none_held.train) == 30
    two = split_subjects([LatentMeta("a"), LatentMeta("b"), LatentMeta("c")], 0.1, 0.0, 5)
    assert len(two.val) == 1 and len(two.train) == 2  # a val subject when asked for and possible
    with pytest.raises(ValueError, match="unique"):
        split_subjects([LatentMeta("a"), LatentMeta("a")], 0.1)


def test_metadata_of_real_pt_files_drives_the_split(tmp_path: Path) -> None:
    """Dict .pt files with upstream metadata, named so that the name alone would mislead: the metadata wins."""
    metas = longitudinal_metas({"PT001_OASIS1": 12, "PT005_IXI": 12}, seed=3)
    write_longitudinal(tmp_path / "lat", metas)
    # one more session of PT001_OASIS1 sub_000 under an unhelpful file name
    first = metas[0]
    torch.save(
        {
            "z": torch.randn(4, 8, 8, 8),
            "metadata": {
                "subject_id": first.subject,
                "session_id": "ses_7",
                "dataset": first.dataset,
                "source_path": "/raw/x.nii.gz",
            },
        },
        tmp_path / "lat" / "renamed_volume.pt",
    )
    scan = scan_latents(tmp_path / "lat", progress=False)
    by_name = {m.name: m for m in scan.metas}
    assert by_name["renamed_volume"].subject == first.subject and by_name[first.name].source_path == first.source_path
    split = split_subjects(scan.metas, 0.10, 0.05, 42)
    _where = [w for w in SPLITS if first.name in split.names(w)][0]
    assert "renamed_volume" in split.names(_where) and split.unmatched == 0
