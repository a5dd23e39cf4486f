"""The README's "Layout of the code" names every module of the package, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout of the code", 1)[1]
    return section.split("```", 2)[1]  # the tree between the first pair of fences


def test_readme_layout_names_every_module_and_no_missing_one() -> None:
    block = layout_block()
    named = set(re.findall(r"\b([a-z_0-9]+)\.py\b", block))  # "loop.py (...)"
    words = set(re.findall(r"\b[a-z_0-9]+\b", block))  # doctor/ lists its modules by concept: "numerics, memory"
    modules = {
        p.stem
        for p in (REPO / "neuromf").rglob("*.py")
        if p.stem != "__init__" and "cli" not in p.relative_to(REPO).parts
    }
    every_module = {p.stem for p in (REPO / "neuromf").rglob("*.py")}  # cli/ included: "one module per verb"
    assert sorted(modules - words) == [], "modules the README layout does not name"
    assert sorted(named - every_module) == [], "the README layout names modules that do not exist"
