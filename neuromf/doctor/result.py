"""One doctor check's result (PASS / FAIL / SKIP and one line), and the whole report as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuromf.atomic import atomic_write_text

__all__ = ["CheckResult", "write_report"]


@dataclass
class CheckResult:
    """`ok` None: the check does not apply here (SKIP). `summary` is the one line a person reads."""

    name: str
    ok: bool | None
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "SKIP" if self.ok is None else ("PASS" if self.ok else "FAIL")

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.summary}"


def write_report(path: Path, header: dict[str, Any], results: list[CheckResult]) -> None:
    """Every check and its numbers, written atomically (whole or not at all)."""
    checks = [{**asdict(r), "status": r.status} for r in results]
    out = {**header, "ok": all(r.ok is not False for r in results), "checks": checks}
    atomic_write_text(Path(path), json.dumps(out, indent=2, default=str) + "\n")
