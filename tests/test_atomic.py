"""neuromf.atomic: files appear whole or not at all; outputs that cannot be written are refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuromf.atomic import atomic_open, atomic_write_text, check_output
from neuromf.errors import UserError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_check_output_names_the_option_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    check_output(tmp_path / "new" / "deeper" / "out.json", "--json")  # creatable: fine
    check_output(tmp_path / "new_folder", "--out", folder=True)
    with pytest.raises(UserError, match=r"^--json: .* is a folder; give a file name$"):
        check_output(tmp_path, "--json")
    with pytest.raises(UserError, match=r"^--json: cannot write .*a_file/out.json"):
        check_output(tmp_path / "a_file" / "out.json", "--json")
    with pytest.raises(UserError, match=r"^--out: .*a_file exists and is not a folder$"):
        check_output(tmp_path / "a_file", "--out", folder=True)
