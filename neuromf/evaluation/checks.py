"""The verification tests P4-T1 .. P4-T8 (docs/design.md, 'Verification tests') as functions of a run's log, checkpoints, samples and evaluation.

Each returns a `Check` with PASS, FAIL or NEEDS-LOOK and the evidence in one
sentence. Loss values are the unweighted MSEs (mse_fm + lambda_mf * mse_mf):
the adaptively weighted loss is ~1 per term whatever the model does (docs/design.md,
'Adaptive loss weighting'), so it cannot show progress.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Check",
    "TITLES",
    "CRITICAL",
    "train_records",
    "val_records",
    "mse_of",
    "epoch_losses",
    "check_started",
    "check_loss_decreases",
    "check_no_nan",
    "check_grids",
    "check_ema_better",
    "check_statistics",
    "check_resume",
    "T7_TOLERANCES",
]

PASS, FAIL, LOOK = "PASS", "FAIL", "NEEDS-LOOK"
TITLES = {
    "P4-T1": "Training starts without error (first 100 steps complete)",
    "P4-T2": "Loss decreases over the first 50 epochs",
    "P4-T3": "No NaN/Inf in loss or gradients",
    "P4-T4": "1-NFE samples at epoch 50 look vaguely brain-like",
    "P4-T5": "1-NFE samples at epoch 200 show clear anatomy",
    "P4-T6": "EMA samples are better than online samples (FD)",
    "P4-T7": "Latent normalisation is applied correctly (statistics)",
    "P4-T8": "Checkpoints save and load correctly (resume continuity)",
}
CRITICAL = {"P4-T1", "P4-T2", "P4-T3", "P4-T4", "P4-T5", "P4-T6"}
# P4-T7: |mean difference| in training stds, and the std ratio; PASS inside the first, FAIL outside the second.
T7_TOLERANCES = {"pass_mean": 0.1, "pass_std": (0.9, 1.1), "fail_mean": 0.5, "fail_std": (0.5, 2.0)}


@dataclass
class Check:
    id: str
    status: str
    evidence: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return TITLES[self.id]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "critical": self.id in CRITICAL, **asdict(self)}


# ---------------------------------------------------------------- the log


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "event" not in r and any(k.startswith("train/") for k in r)]


def val_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "event" not in r and "val/mse_total" in r]


def mse_of(r: dict[str, Any], lambda_mf: float, prefix: str = "train/") -> float:
    """mse_fm + lambda_mf * mse_mf of a record (NaN when absent or not finite)."""
    fm, mf = r.get(f"{prefix}mse_fm"), r.get(f"{prefix}mse_mf")
    return fm + lambda_mf * mf if _finite(fm) and _finite(mf) else math.nan


def epoch_losses(history: dict[str, Any] | None, records: list[dict[str, Any]], lambda_mf: float) -> dict[int, float]:
    """Mean training MSE per completed epoch: the checkpoint's loss history, else the log's step records."""
    out: dict[int, float] = {}
    for h in (history or {}).get("train", []):
        value = mse_of({f"train/{k}": v for k, v in h.items()}, lambda_mf)
        if "epoch" in h and math.isfinite(value):
            out[int(h["epoch"])] = value
    if out:
        return out
    groups: dict[int, list[float]] = {}
    for r in train_records(records):
        value = mse_of(r, lambda_mf)
        if math.isfinite(value):
            # the record's "epoch" counts completed epochs
            groups.setdefault(int(r.get("epoch", 0)) + 1, []).append(value)
    return {e: statistics.fmean(v) for e, v in sorted(groups.items())}


def _nearest(options: list[int], target: int) -> int | None:
    return min(options, key=lambda e: (abs(e - target), e)) if options else None


# ---------------------------------------------------------------- P4-T1 .. P4-T3


def check_started(records: list[dict[str, Any]], global_step: int, total_steps: int | None) -> Check:
    steps = [int(r["step"]) for r in train_records(records)]
    reached = max(steps + [global_step]) if steps or global_step else 0
    stopped = [r for r in records if str(r.get("event", "")).startswith("training stopped")]
    early = [r for r in stopped if int(r.get("step", 0)) < 100]
    details = {"reached_step": reached, "total_steps": total_steps, "first_logged_step": min(steps) if steps else None}
    if early:
        return Check("P4-T1", FAIL, f"the run stopped at step {early[0]['step']}: {early[0]['event']}", details)
    if reached >= 100:
        return Check(
            "P4-T1", PASS, f"the log reaches step {reached} (>= 100) with no 'training stopped' event", details
        )
    if total_steps is not None and reached >= total_steps:
        return Check(
            "P4-T1", PASS, f"the run is shorter than 100 steps and completed all {total_steps} of them", details
        )
    if not steps:
        return Check("P4-T1", FAIL, "the log has no training step at all", details)
    return Check(
        "P4-T1", LOOK, f"only {reached} steps so far (still running, or ended by a crash the log cannot show)", details
    )


def check_loss_decreases(per_epoch: dict[int, float], val: list[dict[str, Any]], lambda_mf: float) -> Check:
    epochs = sorted(per_epoch)
    details: dict[str, Any] = {"per_epoch_mse": per_epoch}
    if len(epochs) < 2:
        return Check("P4-T2", LOOK, f"needs two completed epochs; the run has {len(epochs)}", details)
    first = _nearest(epochs, 1)
    later = _nearest([e for e in epochs if e != first], 50)
    assert first is not None and later is not None
    a, b = per_epoch[first], per_epoch[later]
    details.update(first_epoch=first, later_epoch=later, first_mse=a, later_mse=b)
    said = "epoch 50" if later == 50 else f"epoch {later} (nearest logged to 50)"
    text = f"mean training MSE epoch {first}: {a:.4g} -> {said}: {b:.4g} ({(b - a) / a:+.0%})"
    vals = {int(r["epoch"]): r["val/mse_total"] for r in val if _finite(r.get("val/mse_total"))}
    if len(vals) >= 2:
        v0, v1 = min(vals), _nearest([e for e in vals if e != min(vals)], 50)
        text += f"; EMA validation MSE epoch {v0}: {vals[v0]:.4g} -> epoch {v1}: {vals[v1]:.4g}"
    return Check("P4-T2", PASS if b < a else FAIL, text, details)


def _nonfinite(r: dict[str, Any]) -> bool:
    for k, v in r.items():
        if k.startswith(("train/", "val/", "val_online/")):
            if isinstance(v, str) and v.lower() in {"nan", "inf", "-inf"}:
                return True
            if isinstance(v, float) and not math.isfinite(v):
                return True
    return False


def check_no_nan(records: list[dict[str, Any]]) -> Check:
    bad = [int(r.get("step", 0)) for r in records if r.get("bad_step")]
    nonfinite = [int(r.get("step", 0)) for r in records if "event" not in r and _nonfinite(r)]
    details = {"bad_steps": bad, "nonfinite_records": nonfinite, "records": len(records)}
    if bad or nonfinite:
        shown = ", ".join(map(str, sorted(set(bad + nonfinite))[:8]))
        return Check(
            "P4-T3",
            FAIL,
            f"{len(bad)} skipped NaN/Inf steps and {len(nonfinite)} logged non-finite values "
            f"(steps {shown}{', ...' if len(set(bad + nonfinite)) > 8 else ''})",
            details,
        )
    return Check("P4-T3", PASS, f"0 NaN/Inf steps and no non-finite value in {len(records)} log records", details)


# ---------------------------------------------------------------- P4-T4 / P4-T5


def _grid_in(folder: Path) -> Path | None:
    for pattern in ("ema_nfe1_grid.png", "*_nfe1_grid.png", "*_grid.png"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def check_grids(run_dir: Path, test_id: str, target_epoch: int) -> Check:
    run_dir = Path(run_dir)
    epochs = {}
    for folder in (run_dir / "samples").glob("epoch_*"):
        m = re.fullmatch(r"epoch_(\d+)", folder.name)
        grid = _grid_in(folder) if m and folder.is_dir() else None
        if grid is not None:
            epochs[int(m.group(1))] = grid  # type: ignore[union-attr]
    epoch = _nearest(sorted(epochs), target_epoch)
    if epoch is None:
        return Check(test_id, FAIL, "no sample grids under samples/epoch_*/", {})
    rel = epochs[epoch].relative_to(run_dir).as_posix()
    where = (
        f"epoch {epoch}"
        if epoch == target_epoch
        else f"epoch {epoch} (nearest to {target_epoch}; samples exist for epochs {min(epochs)}..{max(epochs)})"
    )
    return Check(test_id, LOOK, f"visual inspection: [{rel}]({rel}), {where}", {"grid": rel, "epoch": epoch})


# ---------------------------------------------------------------- P4-T6 / P4-T7 (from `neuromf evaluate`)


def _result(evaluation: dict[str, Any], weights: str) -> dict[str, Any] | None:
    rows = sorted((r for r in evaluation.get("results", []) if r["weights"] == weights), key=lambda r: r["nfe"])
    return rows[0] if rows else None


def check_ema_better(evaluation: dict[str, Any] | None, why_missing: str = "not evaluated") -> Check:
    if not evaluation:
        return Check(
            "P4-T6", LOOK, f"{why_missing}: run `neuromf evaluate RUN_DIR` (or verify without --no-evaluate)", {}
        )
    ema, online = _result(evaluation, "ema"), _result(evaluation, "online")
    if ema is None or online is None or ema.get("fd") is None or online.get("fd") is None:
        return Check("P4-T6", LOOK, "the evaluation has no EMA/online FD pair", {})
    n, k = evaluation["n"], ema["nfe"]
    better = ema["fd"] < online["fd"]
    floor = evaluation.get("reference_floor") or {}
    from neuromf.evaluation.evaluate import fd_label

    label = fd_label(evaluation)
    text = (
        f"{label}, NFE {k}: FD(EMA) {ema['fd']:.4g} {'<' if better else '>='} FD(online) {online['fd']:.4g} "
        f"(MMD² {ema['mmd2_mean']:.3g} vs {online['mmd2_mean']:.3g}) with N = {n} samples vs {evaluation['reference']} "
        f"split, {Path(evaluation['checkpoint']).name} at epoch {evaluation['epoch']}"
    )
    if floor.get("fd") is not None:
        text += f"; real-vs-real FD at this N: {floor['fd']:.4g}"
    if n < 500:
        text += f" (P4-T6 asks for 500 samples; only {n} here)"
    fs = evaluation.get("feature_space") or {}
    return Check(
        "P4-T6",
        PASS if better else FAIL,
        text,
        {
            "nfe": k,
            "n": n,
            "fd_ema": ema["fd"],
            "fd_online": online["fd"],
            "fd_used": label,
            "features": fs.get("name"),
            "space": fs.get("space"),
            "comparable_with_literature": bool(fs.get("comparable_with_literature")),
        },
    )


def check_statistics(evaluation: dict[str, Any] | None, why_missing: str = "not evaluated") -> Check:
    if not evaluation:
        return Check("P4-T7", LOOK, f"{why_missing}: run `neuromf evaluate RUN_DIR`", {})
    ema, train = _result(evaluation, "ema"), evaluation.get("training_moments") or []
    if ema is None or not train:
        return Check("P4-T7", LOOK, "the evaluation has no generated or training statistics", {})
    t = T7_TOLERANCES
    rows, worst = [], ("", 0.0, 1.0)
    status = PASS
    for c, (g, r) in enumerate(zip(ema["moments"], train)):
        dm = abs(g["mean"] - r["mean"]) / r["std"] if r["std"] > 0 else math.inf
        sr = g["std"] / r["std"] if r["std"] > 0 else math.inf
        rows.append({"channel": c, "mean_diff_in_std": dm, "std_ratio": sr})
        if dm > t["fail_mean"] or not t["fail_std"][0] <= sr <= t["fail_std"][1]:
            status = FAIL
        elif (dm > t["pass_mean"] or not t["pass_std"][0] <= sr <= t["pass_std"][1]) and status == PASS:
            status = LOOK
        if dm + abs(math.log(max(sr, 1e-12))) > worst[1] + abs(math.log(max(worst[2], 1e-12))):
            worst = (str(c), dm, sr)
    overlap = min(ema.get("histogram_overlap") or [math.nan])
    text = (
        f"EMA NFE {ema['nfe']} vs training latents: worst channel {worst[0] or 0} has its mean off by {worst[1]:.2f} "
        f"training stds and std ratio {worst[2]:.2f} (PASS within {t['pass_mean']} and {t['pass_std'][0]}-{t['pass_std'][1]}, "
        f"FAIL beyond {t['fail_mean']} or {t['fail_std'][0]}-{t['fail_std'][1]}); smallest histogram overlap {overlap:.2f}"
    )
    return Check("P4-T7", status, text, {"channels": rows, "nfe": ema["nfe"]})


# ---------------------------------------------------------------- P4-T8


_RESUMED = re.compile(r"resumed from (.+) at step (\d+)")


def check_resume(records: list[dict[str, Any]], lambda_mf: float, log_every: int, checkpoint_note: str = "") -> Check:
    train = train_records(records)
    steps = [int(r["step"]) for r in train]
    resumes = [(m.group(1), int(m.group(2))) for r in records if (m := _RESUMED.match(str(r.get("event", ""))))]
    if not resumes:
        return Check(
            "P4-T8",
            LOOK,
            "no resume in this run's log; "
            + (checkpoint_note or "nothing to compare")
            + " (interrupt a run and continue it with `neuromf train SPEC --resume auto` to test)",
            {},
        )
    found, status = [], PASS
    for source, step in resumes:
        before = [mse_of(r, lambda_mf) for r in train if int(r["step"]) <= step][-5:]
        after_records = [r for r in train if int(r["step"]) > step]
        after = [mse_of(r, lambda_mf) for r in after_records][:5]
        first_after = int(after_records[0]["step"]) if after_records else None
        before = [v for v in before if math.isfinite(v)]
        after = [v for v in after if math.isfinite(v)]
        item: dict[str, Any] = {"step": step, "from": Path(source).name, "first_step_after": first_after}
        if first_after is None or not before or not after:
            item["verdict"] = "no steps logged on both sides"
            status = LOOK if status == PASS else status
        else:
            ratio = statistics.median(after) / statistics.median(before)
            item.update(mse_before=statistics.median(before), mse_after=statistics.median(after), ratio=ratio)
            ok_steps = step < first_after <= step + log_every
            ok_loss = ratio <= 2.0
            item["verdict"] = (
                "continuous"
                if ok_steps and ok_loss
                else (f"step jumps to {first_after}" if not ok_steps else f"loss jumps x{ratio:.2f}")
            )
            if not (ok_steps and ok_loss):
                status = FAIL
        found.append(item)
    monotonic = all(b > a for a, b in zip(steps, steps[1:]))
    if not monotonic:
        status = FAIL
    parts = [
        f"step {i['step']} from {i['from']}: "
        + (
            f"median MSE {i['mse_before']:.4g} before, {i['mse_after']:.4g} after (x{i['ratio']:.2f}), next logged step {i['first_step_after']}"
            if "ratio" in i
            else i["verdict"]
        )
        for i in found
    ]
    text = (
        f"{len(found)} resume(s): "
        + "; ".join(parts)
        + ("" if monotonic else "; logged steps are not strictly increasing")
    )
    return Check("P4-T8", status, text, {"resumes": found, "steps_increasing": monotonic})
