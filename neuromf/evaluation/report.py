"""`neuromf verify RUN_DIR`: the report of the verification tests P4-T1 .. P4-T8 (docs/design.md, 'Verification tests') of a run, as Markdown and JSON, with a loss-curve PNG.

Files written into the run folder (each whole or not at all):
    verification_report.md     one table row per test (PASS / FAIL / NEEDS-LOOK and the evidence), then details
    verification_report.json   the same, machine-readable
    loss_curve.png             training and validation MSE against step, log scale
    evaluation/                what `neuromf evaluate` writes (reused when it matches the checkpoint)

The verdict: Phase 4 (the project's training stage; docs/design.md, 'Where the names come from')
passes when the critical tests P4-T1 to P4-T6 all pass; P4-T4 and P4-T5 need a person to look at
the sample grids, so the verdict names them.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from neuromf.errors import UserError
from neuromf.evaluation.checks import (
    CRITICAL,
    FAIL,
    PASS,
    Check,
    check_ema_better,
    check_grids,
    check_loss_decreases,
    check_no_nan,
    check_resume,
    check_started,
    check_statistics,
    epoch_losses,
    mse_of,
    train_records,
    val_records,
)
from neuromf.evaluation.runs import LoadedCheckpoint, find_checkpoint, is_run_dir, load_for_eval, read_log

__all__ = ["verify_run", "render_markdown", "write_loss_curve"]


def _total_steps(loaded: LoadedCheckpoint | None) -> int | None:
    """The run's planned optimizer steps (max_steps, or epochs x steps per epoch from the data order)."""
    if loaded is None:
        return None
    t = loaded.spec.training
    if t.max_steps:
        return t.max_steps
    data = loaded.state.get("data_state") or {}
    try:
        per_epoch = int(data["n"]) // (int(data["batch_size"]) * int(data.get("world_size", 1)))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return per_epoch * t.max_epochs


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if math.isfinite(a)]
        out.append(statistics.fmean(finite) if finite else math.nan)
    return out


def write_loss_curve(records: list[dict[str, Any]], lambda_mf: float, path: Path, title: str) -> Path:
    """Training MSE per logged step (raw and a moving average), EMA and online validation MSE; log y; resumes marked."""
    from neuromf.evaluation.plots import COLORS, Series, line_chart, save_png

    train = train_records(records)
    xs = [float(r["step"]) for r in train]
    ys = [mse_of(r, lambda_mf) for r in train]
    if not any(math.isfinite(y) for y in ys):  # old logs without the MSE terms: fall back to the loss
        ys = [
            float(r["train/loss_total"]) if isinstance(r.get("train/loss_total"), (int, float)) else math.nan
            for r in train
        ]
    series = [Series("train MSE", xs, ys, (170, 200, 230), width=1)]
    if len(xs) > 20:
        series.append(Series("train MSE (moving average)", xs, _smooth(ys, max(5, len(xs) // 50)), COLORS[0], width=2))
    val = val_records(records)
    for key, label, color in (
        ("val/mse_total", "val MSE (EMA)", COLORS[1]),
        ("val_online/mse_total", "val MSE (online)", COLORS[2]),
    ):
        pts = [(float(r["step"]), r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if pts:
            series.append(Series(label, [p[0] for p in pts], [p[1] for p in pts], color, dots=True))
    markers = [(float(r["step"]), (44, 160, 44)) for r in records if str(r.get("event", "")).startswith("resumed from")]
    markers += [(float(r["step"]), (214, 39, 40)) for r in records if r.get("bad_step")]
    img = line_chart(
        series,
        title=title,
        xlabel="optimizer step",
        ylabel="MSE (log scale); dashed: resumes (green), NaN steps (red)",
        log_y=True,
        markers=markers,
    )
    return save_png(img, path)


def _evaluation(
    run_dir: Path, n: int | None, mode: str, device: str, progress: bool
) -> tuple[dict[str, Any] | None, str]:
    """(evaluation summary or None, how it was obtained).

    The feature space is the strongest the run-spec's evaluation section configures: a published extractor
    (image-space FID) when it names one whose weights file exists, else the pooled FD, which the report
    labels as not comparable with the literature. mode 'auto': reuse evaluation/evaluation.json when it is
    of the same checkpoint file and step, feature space (and N, if given), else evaluate; 'force': always
    evaluate; 'skip': reuse a matching one, never generate.
    """
    from neuromf.evaluation.evaluate import EvalOptions, evaluate_checkpoint

    path, _ = find_checkpoint(run_dir)
    loaded = load_for_eval(path)
    e = loaded.spec.evaluation
    options = EvalOptions.from_spec(loaded.spec, n=n, device=device, progress=progress)
    fallback = ""
    if e.features != "pooled" and (e.weights is None or not Path(e.weights).is_file()):
        fallback = f"; evaluation.features {e.features} configured but its weights file {e.weights} is missing, so the pooled FD"
        options = EvalOptions.from_spec(
            loaded.spec, n=n, device=device, progress=progress, extractor="pooled", space="latent"
        )
        options.weights_file = None
    existing = run_dir / "evaluation" / "evaluation.json"
    if mode != "force" and existing.is_file():
        try:
            old = json.loads(existing.read_text(encoding="utf-8"))
            same_space = (old.get("extractor") or {}).get("features", "pooled") == options.extractor and (
                old.get("extractor") or {}
            ).get("space", "latent") == options.space
            if (
                old.get("checkpoint") == str(path.resolve())
                and old.get("global_step") == loaded.global_step
                and same_space
                and (n is None or old.get("n") == n)
            ):
                return (
                    old,
                    f"reused {existing.relative_to(run_dir)} (same checkpoint, step and feature space){fallback}",
                )
        except (json.JSONDecodeError, OSError, ValueError):
            pass
    if mode == "skip":
        return None, "not evaluated (--no-evaluate, and no evaluation/evaluation.json of this checkpoint)"
    summary = evaluate_checkpoint(loaded, options, run_dir / "evaluation")
    return summary, f"evaluated {path.name} now{fallback}"


def verify_run(
    run_dir: Path, *, n: int | None = None, evaluation: str = "auto", device: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Check a run folder, write the report files, return the report dict."""
    from neuromf.atomic import atomic_write_text
    from neuromf.evaluation.jsonio import to_json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a NeuroMF run folder (no training_log.jsonl and no checkpoints/*.pt)")
    records = read_log(run_dir)
    latest_path = run_dir / "checkpoints" / "latest.pt"
    latest = load_for_eval(latest_path) if latest_path.is_file() else None
    if latest is None and any((run_dir / "checkpoints").glob("*.pt")):
        latest = load_for_eval(run_dir)
    lambda_mf = latest.spec.meanflow.lambda_mf if latest else 1.0
    log_every = latest.spec.logging.log_every_n_steps if latest else 1
    summary, how = (
        _evaluation(run_dir, n, evaluation, device, progress) if latest else (None, "not evaluated (no checkpoint yet)")
    )

    note = ""
    if latest is not None:
        note = f"{latest.path.name} (step {latest.global_step}) loads and its weights fit the network"
    checks: list[Check] = [
        check_started(records, latest.global_step if latest else 0, _total_steps(latest)),
        check_loss_decreases(
            epoch_losses(latest.state.get("loss_history") if latest else None, records, lambda_mf),
            val_records(records),
            lambda_mf,
        ),
        check_no_nan(records),
        check_grids(run_dir, "P4-T4", 50),
        check_grids(run_dir, "P4-T5", 200),
        check_ema_better(summary, how),
        check_statistics(summary, how),
        check_resume(records, lambda_mf, log_every, note),
    ]
    curve = write_loss_curve(
        records,
        lambda_mf,
        run_dir / "loss_curve.png",
        f"{latest.spec.name if latest else run_dir.name}: training and validation MSE",
    )
    critical = [c for c in checks if c.id in CRITICAL]
    failed = [c.id for c in critical if c.status == FAIL]
    pending = [c.id for c in critical if c.status not in (PASS, FAIL)]
    if failed:
        verdict = f"Phase 4 NOT PASSED: {', '.join(failed)} failed."
    elif pending:
        verdict = f"Phase 4 pending: the automatic checks pass; {', '.join(pending)} need a person's look."
    else:
        verdict = "Phase 4 PASSED: P4-T1 to P4-T6 are all green."
    report: dict[str, Any] = {
        "format": "neuromf-verification-v1",
        "run_dir": str(run_dir.resolve()),
        "name": latest.spec.name if latest else run_dir.name,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "latest_checkpoint": {"path": latest.path.name, "global_step": latest.global_step, "epoch": latest.epoch}
        if latest
        else None,
        "evaluation": {
            "how": how,
            "checkpoint": Path(summary["checkpoint"]).name,
            "n": summary["n"],
            "file": "evaluation/evaluation.json",
        }
        if summary
        else {"how": how},
        "tests": [c.as_dict() for c in checks],
        "critical_failed": failed,
        "needs_look": [c.id for c in checks if c.status not in (PASS, FAIL)],
        "phase_4_passed": not failed and not pending,
        "verdict": verdict,
        "files": {"markdown": "verification_report.md", "loss_curve": curve.name},
    }
    atomic_write_text(run_dir / "verification_report.json", to_json(report))
    atomic_write_text(run_dir / "verification_report.md", render_markdown(report, summary))
    return report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any], evaluation: dict[str, Any] | None) -> str:
    """The report as Markdown: the eight-line table first, then the figures and tables behind it."""
    latest = report.get("latest_checkpoint") or {}
    lines = [
        f"# Verification report: {report['name']}",
        "",
        f"Run folder: `{report['run_dir']}`  ",
        f"Latest checkpoint: {latest.get('path', '-')} (step {latest.get('global_step', '-')}, epoch {latest.get('epoch', '-')})  ",
        f"Evaluation: {report['evaluation']['how']}  ",
        f"Generated: {report['generated']}",
        "",
        f"**{report['verdict']}**",
        "",
        "| Test | Description | Critical | Status | Evidence |",
        "|---|---|---|---|---|",
    ]
    for t in report["tests"]:
        lines.append(
            f"| {t['id']} | {_cell(t['title'])} | {'yes' if t['critical'] else 'no'} | **{t['status']}** | {_cell(t['evidence'])} |"
        )
    lines += ["", "## Loss curve", "", f"![loss curve]({report['files']['loss_curve']})", ""]
    grids = [t for t in report["tests"] if t["id"] in ("P4-T4", "P4-T5") and t["details"].get("grid")]
    if grids:
        lines += ["## Sample grids (P4-T4, P4-T5: visual inspection)", ""]
        for t in grids:
            lines += [f"{t['id']}, epoch {t['details']['epoch']}:", "", f"![{t['id']}]({t['details']['grid']})", ""]
    if evaluation:
        lines += _evaluation_tables(evaluation)
    return "\n".join(lines) + "\n"


def _fmt(v: Any, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _evaluation_tables(ev: dict[str, Any]) -> list[str]:
    from neuromf.evaluation.evaluate import fd_label

    fs = ev["feature_space"]
    lines = [
        "## Samples vs held-out data (P4-T6)",
        "",
        f"{Path(ev['checkpoint']).name}, step {ev['global_step']}, epoch {ev['epoch']}; N = {ev['n']} samples per row against "
        f"{ev['n']} {ev['reference']} volumes. FD column: {fd_label(ev)}. Feature space `{fs['name']}` ({fs['dim']} dims per volume): "
        f"{fs['description']}"
        + (
            f" (weights sha256 {ev['extractor']['weights_sha256']})"
            if (ev.get("extractor") or {}).get("weights_sha256")
            else ""
        )
        + ". "
        + (
            f"MS-SSIM of real volumes: {_fmt(ev.get('reference_ms_ssim'), '.3f')}. "
            if ev.get("reference_ms_ssim") is not None
            else ""
        )
        + f"MMD² bandwidths {', '.join(_fmt(b, '.3g') for b in ev['mmd_bandwidths'])}. Diversity: mean pairwise RMS distance "
        f"(real latents: {_fmt(ev['reference_diversity'])}).",
        "",
        "| Weights | NFE | FD | MMD² (mean) | MS-SSIM | Diversity | Diversity / real |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ev["results"]:
        planes = ", ".join(f"{p} {_fmt(v)}" for p, v in (r.get("fd_planes") or {}).items())
        lines.append(
            f"| {r['weights']} | {r['nfe']} | {_fmt(r['fd'])}{f' ({planes})' if planes else ''} | {_fmt(r['mmd2_mean'], '.3g')} "
            f"| {_fmt(r.get('ms_ssim'), '.3f')} | {_fmt(r['diversity'])} | {_fmt(r['diversity_ratio'], '.3f')} |"
        )
    floor = ev.get("reference_floor")
    if floor:
        lines.append(
            f"| real (training vs {ev['reference']}) | - | {_fmt(floor['fd'])} | {_fmt(floor['mmd2_mean'], '.3g')} "
            f"| {_fmt(ev.get('reference_ms_ssim'), '.3f')} | - | - |"
        )
    lines += [
        "",
        "## Latent statistics (P4-T7)",
        "",
        f"De-normalised values; training statistics from {ev['n_train_stats']} training latents. "
        f"Histograms: [evaluation/{ev['files']['histograms']}](evaluation/{ev['files']['histograms']})",
        "",
        "| Channel | Set | Mean | Std | Skewness | Kurtosis | Histogram overlap |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, t in enumerate(ev["training_moments"]):
        lines.append(
            f"| {c} | training | {_fmt(t['mean'])} | {_fmt(t['std'])} | {_fmt(t['skewness'], '.3f')} | {_fmt(t['kurtosis'], '.3f')} | 1 |"
        )
        for r in ev["results"]:
            m = r["moments"][c]
            lines.append(
                f"| {c} | {r['weights']} NFE {r['nfe']} | {_fmt(m['mean'])} | {_fmt(m['std'])} | {_fmt(m['skewness'], '.3f')} "
                f"| {_fmt(m['kurtosis'], '.3f')} | {_fmt(r['histogram_overlap'][c], '.3f')} |"
            )
    lines += ["", f"![latent histograms](evaluation/{ev['files']['histograms']})", ""]
    return lines
