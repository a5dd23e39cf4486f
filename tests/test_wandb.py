"""wandb in offline mode, as the production run-spec uses it: the real package, no mocks.

The run id is kept in the run folder so a resumed or requeued job continues the same wandb run; every folder wandb
writes lands in the run folder (never $HOME, which may be read-only under `docker run --user` or Apptainer).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _wandb_offline import wait_for_exit_record, wandb_history, wandb_run_ids

from neuromf.spec import runspec_from_dict
from neuromf.train.run_log import RunLog

WANDB_ID_FILE = "wandb_run_id.txt"  # the run folder's record of the wandb run id


@pytest.fixture
def clean_env(tmp_path: Path) -> Iterator[Path]:
    """No WANDB_* from the caller, an empty $HOME to check nothing lands there; the environment restored after."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("WANDB_") or name in {"XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"}:
            del os.environ[name]
    home = tmp_path / "home"
    home.mkdir()
    os.environ["HOME"] = str(home)
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_offline_run_keeps_its_id_across_a_resume_and_logs_scalars(tmp_path: Path, clean_env: Path) -> None:
    run_dir = tmp_path / "run"
    spec = runspec_from_dict(
        {
            "name": "wandb-test",
            "paths": {"run_dir": str(run_dir)},
            "logging": {"wandb": True, "wandb_mode": "offline", "progress": "plain"},
        },
        base_dir=tmp_path,
    )
    first = RunLog(spec, total_steps=6, start_step=0, resumed=False)
    for step in (1, 2, 3):
        first.log({"step": step, "train/loss_total": 1.0 / step, "lr": 1e-4})
    first.close()
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()

    second = RunLog(spec, total_steps=6, start_step=3, resumed=True)
    second.log({"step": 4, "train/loss_total": 0.25, "lr": 1e-4})
    second.close()
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id

    files = wait_for_exit_record(run_dir / "wandb", 2)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files), files
    assert set().union(*(wandb_run_ids(f) for f in files)) == {run_id}
    rows = [row for f in files for row in wandb_history(f)]
    assert [(r["_step"], r["train/loss_total"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert all(r["lr"] == 1e-4 for r in rows)
    assert list(clean_env.iterdir()) == [], "wandb wrote into $HOME"
