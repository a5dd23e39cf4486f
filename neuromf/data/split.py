"""Subject-level, dataset-stratified, deterministic train/val/test split.

Every subject (key "dataset/subject", see meta.py) draws one number
u = sha256(split_seed, key) in [0, 1): u < test_fraction -> test,
u < test_fraction + val_fraction -> val, otherwise train. All latents (sessions)
of a subject go where the subject goes, so no subject is in two splits. The
place of a subject depends on nothing but its own key: not on the listing order,
not on the machine, not on which other subjects exist, so adding subjects
never moves existing ones.

Stratification: in a dataset with at least MIN_STRATIFIED subjects whose draw
left val (or test) empty, the subject nearest the band is promoted into it
(the smallest u for test, the smallest u still in train for val); and when the
whole set has no val subject at all (tiny sets), one is promoted the same way.
This guarantee and strict stability cannot both hold for every growth of a
dataset (a rule that depends on nothing but the subject cannot guarantee a
non-empty val of 10 subjects): a *promoted* subject can go back to its drawn
split when added subjects fill the band. Promotions are listed in split.json,
and a resume whose split changed is refused (record.py). The split sizes are
binomial around the fractions (e.g. val 10 % +- 1.3 % of 500 subjects).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from neuromf.data.meta import LatentMeta, subject_keys
from neuromf.seeding import derived_fraction

SPLITS = ("train", "val", "test")
MIN_STRATIFIED = 10  # datasets with at least this many subjects always get a val and a test subject


def subject_draw(key: str, seed: int) -> float:
    """The subject's number in [0, 1): a pure function of (seed, key)."""
    return derived_fraction(seed, key)


@dataclass
class Split:
    """Names per split (sorted), and who went where."""

    train: list[str]
    val: list[str]
    test: list[str]
    subject_of: dict[str, str]  # name -> subject key
    dataset_of: dict[str, str]  # name -> dataset
    promoted: list[str] = field(default_factory=list)  # "key -> split"
    unmatched: int = 0  # names that matched no subject pattern (each is its own subject)

    def names(self, which: str) -> list[str]:
        return {"train": self.train, "val": self.val, "test": self.test}[which]

    def subjects(self, which: str) -> set[str]:
        return {self.subject_of[n] for n in self.names(which)}

    def by_dataset(self) -> dict[str, dict[str, dict[str, int]]]:
        """dataset -> split -> {"latents": n, "subjects": n}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for which in SPLITS:
            subjects: dict[str, set[str]] = defaultdict(set)
            latents: dict[str, int] = defaultdict(int)
            for n in self.names(which):
                subjects[self.dataset_of[n]].add(self.subject_of[n])
                latents[self.dataset_of[n]] += 1
            for ds in set(self.dataset_of.values()):
                out.setdefault(ds or "(unknown)", {})[which] = {
                    "latents": latents.get(ds, 0),
                    "subjects": len(subjects.get(ds, ())),
                }
        return dict(sorted(out.items()))

    def summary_lines(self) -> list[str]:
        """'train: N latents, S subjects, D datasets' per split."""
        lines = []
        for which in SPLITS:
            names = self.names(which)
            datasets = {self.dataset_of[n] for n in names}
            lines.append(
                f"{which}: {len(names)} latents, {len(self.subjects(which))} subjects, {len(datasets)} datasets"
            )
        return lines


def split_subjects(
    metas: Sequence[LatentMeta],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 42,
    subject_from: str = "metadata",
) -> Split:
    """Split latents by subject (see the module docstring). Independent of the order of `metas`."""
    names = [m.name for m in metas]
    if len(set(names)) != len(names):
        raise ValueError("latent names must be unique")
    found = subject_keys(metas, subject_from)
    draw: dict[str, float] = {}
    dataset_subjects: dict[str, set[str]] = defaultdict(set)
    for name in names:
        key = found.keys[name]
        draw[key] = subject_draw(key, seed)
        dataset_subjects[found.datasets[name]].add(key)
    place = {
        key: ("test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train")
        for key, u in draw.items()
    }
    promoted: list[str] = []

    def promote(candidates: set[str], to: str, eligible: tuple[str, ...]) -> None:
        pool = sorted((draw[k], k) for k in candidates if place[k] in eligible)
        if pool:
            key = pool[0][1]
            place[key] = to
            promoted.append(f"{key} -> {to}")

    for dataset in sorted(dataset_subjects):
        keys = dataset_subjects[dataset]
        if len(keys) < MIN_STRATIFIED:
            continue
        if test_fraction > 0 and not any(place[k] == "test" for k in keys):
            promote(keys, "test", ("val", "train"))
        if val_fraction > 0 and not any(place[k] == "val" for k in keys):
            promote(keys, "val", ("train",))
    all_keys = set(draw)
    if val_fraction > 0 and len(all_keys) >= 2 and not any(p == "val" for p in place.values()):
        if sum(p == "train" for p in place.values()) >= 2:
            promote(all_keys, "val", ("train",))
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in names:
        parts[place[found.keys[name]]].append(name)
    return Split(
        sorted(parts["train"]),
        sorted(parts["val"]),
        sorted(parts["test"]),
        dict(found.keys),
        dict(found.datasets),
        sorted(promoted),
        found.unmatched,
    )


def estimate_sizes(n: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int, int]:
    """(train, val, test) latents expected for n latents (the real split is by subject: sizes vary around these)."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val, n_test = min(n_val, max(0, n - 1)), min(n_test, max(0, n - 1 - n_val))
    return n - n_val - n_test, n_val, n_test
