"""What a run reports: JSON lines, training_log.json, wandb (optional) and a progress display.

`training_log.jsonl` gets one record per logged step, validation and event.
On resume it is cut back to the checkpoint's step, so a run interrupted and
resumed leaves the same log as one that never stopped. `training_log.json` is
the same content grouped ({"train": [...], "val": [...], "events": [...]}),
rewritten atomically at every checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuromf.atomic import atomic_write_text, write_error
from neuromf.spec.schema import RunSpec


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so a bad step is still visible in the log."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class SilentLog:
    """The run log of ranks other than 0 (rank 0 reports for all) and of Trainer.for_steps: nothing is logged."""

    use_bar = False

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class RunLog:
    def __init__(self, spec: RunSpec, total_steps: int, start_step: int, resumed: bool) -> None:
        self.spec = spec
        self.run_dir = spec.paths.run_dir
        self.jsonl = self.run_dir / "training_log.jsonl"
        self.summary = self.run_dir / "training_log.json"
        self.total_steps = total_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.records = self._read_and_truncate(start_step if resumed else 0)
        try:
            self._file = open(self.jsonl, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(self.jsonl, e) from None
        mode = spec.logging.progress
        self.use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self._bar = None
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._wandb = self._start_wandb() if spec.logging.wandb else None
        self._t0, self._step0 = time.perf_counter(), start_step

    def _read_and_truncate(self, keep_until_step: int) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        records = []
        for line in self.jsonl.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= keep_until_step:
                records.append(record)
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def _start_wandb(self) -> Any:
        return start_wandb(self.spec)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must carry 'step'); also sent to wandb."""
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))
        self.records.append(record)
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # disk full: one line naming the log (the checkpoints are untouched)
            raise write_error(self.jsonl, e) from None
        if self._wandb is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in {"step", "time"}}
            if numbers:
                self._wandb.log(numbers, step=record["step"])

    def log_images(self, step: int, epoch: int, images: dict[str, Path]) -> None:
        """Send PNGs (periodic sample grids) to wandb as images at `step`, with their epoch; no-op without wandb."""
        if self._wandb is None or not images:
            return
        import wandb

        entries: dict[str, Any] = {
            f"samples/{label}": wandb.Image(str(path), caption=f"{label}, epoch {epoch}")
            for label, path in images.items()
        }
        self._wandb.log({**entries, "epoch": epoch}, step=step)

    def event(self, step: int, message: str, **fields: Any) -> None:
        self.log({"step": step, "event": message, **fields})
        self.say(message)

    def say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def progress(self, step: int, epoch: int, metrics: dict[str, float], printed: bool) -> None:
        """Advance the bar every step; in plain mode, print a line when `printed` (a logging step)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(epoch=epoch, **self._shown(metrics), refresh=False)
            return
        if not printed:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        shown = " | ".join(f"{k} {v}" for k, v in self._shown(metrics).items())
        print(
            f"step {step}/{self.total_steps} | epoch {epoch} | {shown} | {rate:.2f} it/s | ETA {_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def _shown(self, metrics: dict[str, float]) -> dict[str, str]:
        """The training MSEs of the progress display, and their sum as validation reports it (mse_total).

        Not loss_total: the adaptive weight makes each loss term the batch mean of l / (l + norm_eps) (norm_p 1),
        about 1 whatever the error, so loss_total sits near 1 + lambda_mf for the whole run; the MSEs are what falls.
        """
        fm, mf = metrics.get("train/mse_fm"), metrics.get("train/mse_mf")
        shown = {name: f"{value:.4g}" for name, value in (("mse_fm", fm), ("mse_mf", mf)) if value is not None}
        if fm is not None and mf is not None:
            shown["mse_total"] = f"{fm + self.spec.meanflow.lambda_mf * mf:.4g}"
        return shown

    def write_summary(self) -> None:
        grouped: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "events": []}
        for r in self.records:
            kind = "events" if "event" in r else "val" if any(k.startswith("val/") for k in r) else "train"
            grouped[kind].append(r)
        atomic_write_text(self.summary, json.dumps({"name": self.spec.name, **grouped}, indent=1))

    def close(self) -> None:
        self.write_summary()
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


WANDB_ID_FILE = "wandb_run_id.txt"
# wandb's folders besides the run's own: WANDB_DIR gets offline-run-*/ (what `wandb sync` uploads); the others
# default to ~/.cache, ~/.config and ~/.local/share, which may be read-only (`docker run --user`, Apptainer).
WANDB_FOLDERS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_CONFIG_DIR": "config",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
}


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id, made once and kept in the run folder: a resumed or requeued job continues that run."""
    id_file = run_dir / WANDB_ID_FILE
    if id_file.exists():
        run_id = id_file.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    alphabet = string.ascii_lowercase + string.digits  # wandb's own id alphabet and length
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    atomic_write_text(id_file, run_id + "\n")
    return run_id


def start_wandb(spec: RunSpec) -> Any:
    """wandb.init for this run: same id on every start, files under <run_dir>/wandb, offline unless asked."""
    import wandb

    from neuromf.train.runtime import writable_folder

    folder = spec.paths.run_dir / "wandb"
    for name, sub in WANDB_FOLDERS.items():
        current = os.environ.get(name)
        if not (current and writable_folder(current)):
            os.environ[name] = str(folder / sub)
            (folder / sub).mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(spec.paths.run_dir)  # wandb.init(dir=...) below; child processes see it too
    return wandb.init(
        project=spec.logging.wandb_project,
        name=spec.name,
        id=wandb_run_id(spec.paths.run_dir),
        resume="allow",
        dir=str(spec.paths.run_dir),
        mode=spec.logging.wandb_mode,
        config=spec.model_dump(mode="json"),
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
