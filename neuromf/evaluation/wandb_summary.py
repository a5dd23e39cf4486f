"""`neuromf evaluate` results into the run's wandb run (when the run-spec logs to wandb), as summary values.

The run's id is in <run_dir>/wandb_run_id.txt (written by the trainer), so the numbers join the same run as
the training curves, also offline. Summary values, not a logged step: an evaluation of best.pt comes after
the run's last step, and wandb drops values logged at earlier steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["evaluation_metrics", "send_to_wandb"]


def evaluation_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Flat 'evaluate/...' numbers of an evaluation summary."""
    out: dict[str, Any] = {
        "evaluate/n": summary["n"],
        "evaluate/step": summary["global_step"],
        "evaluate/features": f"{summary['feature_space']['name']} ({summary['feature_space']['space']} space)",
    }
    for r in summary["results"]:
        tag = f"{r['weights']}_nfe{r['nfe']}"
        out[f"evaluate/fid_{tag}"] = r["fd"]
        out.update({f"evaluate/fid_{tag}_{p}": v for p, v in (r.get("fd_planes") or {}).items()})
        out[f"evaluate/mmd2_{tag}"] = r["mmd2_mean"]
        if r.get("ms_ssim") is not None:
            out[f"evaluate/ms_ssim_{tag}"] = r["ms_ssim"]
    if summary.get("reference_ms_ssim") is not None:
        out["evaluate/ms_ssim_real"] = summary["reference_ms_ssim"]
    if summary.get("reference_floor"):
        out["evaluate/fid_real_floor"] = summary["reference_floor"]["fd"]
    return {k: v for k, v in out.items() if v is not None}


def send_to_wandb(spec: Any, run_dir: Path, summary: dict[str, Any]) -> str | None:
    """Put the numbers into the run's wandb summary; returns what happened in words (None: wandb is off)."""
    if not spec.logging.wandb or spec.logging.wandb_mode == "disabled":
        return None
    id_file = Path(run_dir) / "wandb_run_id.txt"
    if not id_file.is_file():
        return f"not sent to wandb: {id_file} is missing (the run never started wandb)"
    import wandb

    run = wandb.init(
        project=spec.logging.wandb_project,
        name=spec.name,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(run_dir),
        mode=spec.logging.wandb_mode,
    )
    try:
        run.summary.update(evaluation_metrics(summary))
    finally:
        run.finish()
    return f"sent to wandb run {run.id} ({spec.logging.wandb_mode})"
