"""Per-latent metadata (subject, session, dataset, source path) and the subject key the split groups by.

Metadata comes from the sources when they have it (the `metadata` dict of an
upstream `.pt` file, the string datasets of an upstream HDF5 shard, the string
datasets of a NeuroMF shard) and is otherwise parsed from the latent's name.
The subject key is (dataset, subject): upstream subject ids such as `sub_002`
repeat across datasets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuromf.errors import UserError

# FOMO-60K names: {dataset}_{subject}_{session}, e.g. PT005_IXI_sub_002_ses_1 -> dataset PT005_IXI, subject sub_002.
DEFAULT_SUBJECT_PATTERN = (
    r"^(?P<dataset>.+?)_(?P<subject>sub[-_]?[A-Za-z0-9]+)(?:_(?P<session>ses[-_]?[A-Za-z0-9]+))?(?:_.*)?$"
)
META_FIELDS = ("subject", "session", "dataset", "source_path")


@dataclass(frozen=True)
class LatentMeta:
    """What is known about one latent besides its values; "" when unknown."""

    name: str
    subject: str = ""
    session: str = ""
    dataset: str = ""
    source_path: str = ""

    @property
    def from_source(self) -> bool:
        """True when the source named the subject (not parsed from the name)."""
        return bool(self.subject)


def meta_from_dict(name: str, raw: Any) -> LatentMeta:
    """LatentMeta from an upstream `.pt` file's `metadata` dict (keys subject_id, session_id, dataset, source_path)."""
    if not isinstance(raw, dict):
        return LatentMeta(name)

    def text(*keys: str) -> str:
        for key in keys:
            value = raw.get(key)
            if value is not None and not isinstance(value, (dict, list, tuple)):
                return str(value)
        return ""

    return LatentMeta(
        name,
        text("subject_id", "subject"),
        text("session_id", "session"),
        text("dataset", "dataset_name"),
        text("source_path"),
    )


def compile_subject_pattern(pattern: str, where: str = "data.subject_from") -> re.Pattern[str]:
    """A regular expression with a `subject` group (and optionally `dataset`, `session`); UserError otherwise."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}: {pattern!r} is not a regular expression ({e})") from None
    if "subject" not in rx.groupindex:
        raise UserError(f"{where}: {pattern!r} has no (?P<subject>...) group")
    return rx


@dataclass
class SubjectKeys:
    """Each latent's subject key and dataset, and how many names matched no pattern (their own subject)."""

    keys: dict[str, str]  # name -> "dataset/subject"
    datasets: dict[str, str]  # name -> dataset ("" when unknown)
    unmatched: int


def subject_keys(metas: Sequence[LatentMeta], subject_from: str = "metadata") -> SubjectKeys:
    """Subject key per latent.

    subject_from "metadata": the source's subject (and dataset) when present,
    else the default pattern on the name. A regular expression: its `subject`
    (and `dataset`, when the pattern has one) groups on the name; the source's
    dataset is kept when the pattern names none. A name that matches nothing
    is its own subject.
    """
    use_meta = subject_from == "metadata"
    rx = compile_subject_pattern(DEFAULT_SUBJECT_PATTERN if use_meta else subject_from)
    keys, datasets, unmatched = {}, {}, 0
    for m in metas:
        subject, dataset = (m.subject, m.dataset) if use_meta and m.subject else ("", m.dataset)
        if not subject:
            hit = rx.match(m.name)
            if hit and hit.group("subject"):
                subject = hit.group("subject")
                if "dataset" in rx.groupindex and hit.group("dataset"):
                    dataset = hit.group("dataset")
            else:
                unmatched += 1
                subject = m.name
        keys[m.name] = f"{dataset}/{subject}"
        datasets[m.name] = dataset
    return SubjectKeys(keys, datasets, unmatched)


def parsed_meta(name: str, source_path: str = "") -> LatentMeta:
    """Metadata parsed from a name with the default pattern (shards packed before metadata was stored)."""
    hit = re.match(DEFAULT_SUBJECT_PATTERN, name)
    if not hit:
        return LatentMeta(name, source_path=source_path)
    return LatentMeta(
        name, hit.group("subject") or "", hit.group("session") or "", hit.group("dataset") or "", source_path
    )
