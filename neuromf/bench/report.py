"""`neuromf bench` results: ratios between variants, the performance targets (docs/design.md, 'Performance targets'), the table, and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from neuromf.atomic import atomic_write_text

__all__ = ["format_table", "ratios_and_targets", "write_json"]

# (key, numerator, denominator, measure): time ratios are step-time medians, memory ratios peak step memory.
RATIOS: list[tuple[str, str, str, str]] = [
    ("speedup_compiled_vs_predecessor", "predecessor", "compiled", "time"),
    ("speedup_eager_vs_predecessor", "predecessor", "eager", "time"),
    ("memory_compiled_vs_predecessor", "compiled", "predecessor", "memory"),
    ("memory_eager_vs_predecessor", "eager", "predecessor", "memory"),
    ("cost_naive_vs_predecessor", "naive", "predecessor", "time"),
    ("speedup_compiled_vs_naive", "naive", "compiled", "time"),
    ("speedup_eager_vs_naive", "naive", "eager", "time"),
    ("speedup_compiled_vs_eager", "eager", "compiled", "time"),
    ("memory_compiled_vs_naive", "compiled", "naive", "memory"),
    ("memory_eager_vs_naive", "eager", "naive", "memory"),
    ("cost_eager_vs_fm", "eager", "fm", "time"),
    ("cost_compiled_vs_fm_compiled", "compiled", "fm_compiled", "time"),
    ("memory_eager_vs_fm", "eager", "fm", "memory"),
    ("speedup_fold_zero_tangents", "compiled_nofold", "compiled", "time"),
    ("speedup_dual_biases", "eager_const_params", "eager", "time"),
]

# The targets of docs/design.md, 'Performance targets'. (key, label, threshold, "min" | "max"): met when value >= / <= threshold.
COMPARE_TARGETS: list[tuple[str, str, float, str]] = [
    ("speedup_compiled_vs_predecessor", "compiled step >= 1.5x faster than the predecessor's step", 1.5, "min"),
    ("memory_compiled_vs_predecessor", "compiled step <= 0.6x the predecessor step's peak memory", 0.6, "max"),
    ("speedup_compiled_vs_naive", "compiled step >= 2x faster than the naive reference", 2.0, "min"),
    ("memory_compiled_vs_naive", "compiled step <= 0.6x the naive reference's peak memory", 0.6, "max"),
    ("cost_eager_vs_fm", "our step <= 2.5x the flow-matching step (both eager)", 2.5, "max"),
    ("cost_compiled_vs_fm_compiled", "our step <= 2.5x the flow-matching step (both compiled)", 2.5, "max"),
]
PREDECESSOR_LATENTS_PER_S = 3.4  # the earlier research code: 132 latents per ~6.5 s step on 6 A100-40GB (docs/design.md, 'Where the names come from')
GPU_MEMORY_LIMIT = 40e9  # an A100 "40GB" has 39.6 GiB; 40e9 bytes (37.3 GiB) leaves room for the CUDA context


def _value(v: dict[str, Any], measure: str, clock: str, stat: str) -> float | None:
    if v.get("error"):
        return None
    if measure == "time":
        times = v.get(clock)
        return times[stat] if times else None
    return v.get("peak_step_bytes")


def _ratios(variants: dict[str, Any], stat: str, clock: str = "step_s") -> dict[str, float]:
    ratios: dict[str, float] = {}
    for key, num, den, measure in RATIOS:
        if measure == "memory" and (stat, clock) != ("median", "step_s"):
            continue  # memory has one number per variant: it belongs to the main ratios only
        if num in variants and den in variants:
            a, b = _value(variants[num], measure, clock, stat), _value(variants[den], measure, clock, stat)
            if a is not None and b:
                ratios[key] = a / b
    return ratios


def ratios_and_targets(out: dict[str, Any]) -> dict[str, Any]:
    """{"ratios": from median step times, "ratios_best": from the fastest steps, "ratios_cpu": from the
    median CPU time per step (CPU devices), "targets": [...]}.

    The targets are judged on the median wall times. On a shared machine other processes only
    ever add wall time, so the fastest steps and the CPU times are the better estimates there.
    """
    variants = out["variants"]
    ratios = _ratios(variants, "median")
    targets = []
    for key, label, threshold, kind in COMPARE_TARGETS:
        if key in ratios:
            value = ratios[key]
            targets.append(
                {
                    "name": label,
                    "value": value,
                    "threshold": threshold,
                    "kind": kind,
                    "met": value >= threshold if kind == "min" else value <= threshold,
                }
            )
    if out["device"]["type"] == "cuda":
        proj = out.get("projection")
        main = variants.get(proj["variant"]) if proj else None
        if main is not None:
            if main.get("mfu") is not None:
                targets.append(
                    {
                        "name": "MFU >= 35 % (H100, bf16, dense peak)",
                        "value": main["mfu"],
                        "threshold": 0.35,
                        "kind": "min",
                        "met": main["mfu"] >= 0.35,
                    }
                )
            lps = main["latents_per_s"]
            targets.append(
                {
                    "name": f">= 8x the predecessor's {PREDECESSOR_LATENTS_PER_S} latents/s per GPU",
                    "value": lps,
                    "threshold": 8 * PREDECESSOR_LATENTS_PER_S,
                    "kind": "min",
                    "met": lps >= 8 * PREDECESSOR_LATENTS_PER_S,
                }
            )
            reserved = main.get("peak_reserved_bytes")
            if reserved is not None:
                targets.append(
                    {
                        "name": f"a step of {out['settings']['batch_size']} within 40 GB (peak reserved)",
                        "value": reserved,
                        "threshold": GPU_MEMORY_LIMIT,
                        "kind": "max",
                        "met": reserved <= GPU_MEMORY_LIMIT,
                    }
                )
    cpu = _ratios(variants, "median", "step_cpu_s") if out["device"]["type"] != "cuda" else {}
    return {"ratios": ratios, "ratios_best": _ratios(variants, "min"), "ratios_cpu": cpu, "targets": targets}


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f} MiB"


def _s(x: float) -> str:
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def format_table(out: dict[str, Any]) -> str:
    """The human-readable report printed to stdout."""
    dev, st, ver = out["device"], out["settings"], out["versions"]
    where = f"{dev['name']}, {dev.get('torch_threads', '')} torch threads" if dev["type"] == "cpu" else dev["name"]
    shape = "x".join(str(s) for s in st["latent_shape"])
    lines = [
        f"neuromf bench: {out['spec']} on {dev['type']} ({where}); torch {ver['torch']}, monai {ver['monai']}; {out['date']}",
        f"batch {st['batch_size']} (micro-batch {st['micro_batch_size']}) of {shape}, {st['parameters'] / 1e6:.2f} M parameters, "
        f"{st['precision']}, checkpointing {'on' if st['gradient_checkpointing'] else 'off'}, "
        f"channels_last {'on' if st['channels_last'] else 'off'}, compile mode {st.get('compile_mode', 'default')}, "
        f"data {st['residency']}; "
        f"{st['steps']} timed steps after {st['warmup'] + 1} untimed{', interleaved' if st.get('interleave') else ''}",
        "",
    ]
    header = (
        "variant",
        "step: median [min..max]",
        "CPU s/step",
        "latents/s",
        "data wait",
        "peak step mem",
        "GFLOP/step",
        "fwd-eq/latent",
        "TFLOP/s",
        "MFU",
        "1st step",
        "1st grad norm",
    )
    rows = [header]
    for name, v in out["variants"].items():
        if v["error"]:
            rows.append((name, f"FAILED: {v['error']}", *[""] * 10))
            continue
        s = v["step_s"]
        rows.append(
            (
                name,
                f"{_s(s['median'])} [{_s(s['min'])}..{_s(s['max'])}]",
                "-" if not v.get("step_cpu_s") else f"{v['step_cpu_s']['median']:.2f}",
                f"{v['latents_per_s']:.2f}",
                f"{100 * v['data_wait_fraction']:.1f} %",
                _mib(v.get("peak_step_bytes")),
                "-" if v["flops_per_step"] is None else f"{v['flops_per_step'] / 1e9:.1f}",
                "-"
                if v.get("forward_equivalents_per_latent") is None
                else f"{v['forward_equivalents_per_latent']:.2f}",
                "-" if v["achieved_tflops"] is None else f"{v['achieved_tflops']:.3f}",
                "-" if v.get("mfu") is None else f"{100 * v['mfu']:.1f} %",
                _s(v["first_step_s"]),
                f"{v['first_step']['grad_norm']:.6g}",
            )
        )
    widths = [max(len(r[i]) for r in rows if not r[1].startswith("FAILED") or i < 2) for i in range(len(header))]
    for r in rows:
        if r[1].startswith("FAILED"):
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if out["ratios"]:
        best, cpu = out.get("ratios_best", {}), out.get("ratios_cpu", {})
        lines += ["", f"ratios{'':<26} median  fastest  CPU time (median)"]
        lines += [
            f"  {k:<30} {v:6.2f}  {best.get(k, math.nan):7.2f}  {cpu.get(k, math.nan):6.2f}".replace("nan", "  -")
            for k, v in out["ratios"].items()
        ]
    if out["targets"]:
        lines += ["", "targets:"]
        for t in out["targets"]:
            lines.append(
                f"  [{'met' if t['met'] else 'NOT met'}] {t['name']}: {t['value']:.3g} (threshold {t['threshold']:.3g})"
            )
    for name, v in out["variants"].items():
        if v.get("profile"):
            lines += ["", f"{name}: the ops with the most self time in one step"]
            lines += [
                f"  {100 * k['share']:5.1f} %  {k['self_ms']:9.1f} ms  {k['calls']:6d} x  {k['name'][:90]}"
                for k in v["profile"]
            ]
    proj = out.get("projection")
    if proj:
        lines += [
            "",
            f"projection ({proj['variant']}): {proj['total_steps']} steps x {_s(proj['seconds_per_step'])} = "
            f"{proj['run_hours']:.2f} h of training steps on this device "
            f"({proj['steps_per_epoch']} steps/epoch; validation, samples and checkpoints not included)",
        ]
    mem = next((v["mem_method"] for v in out["variants"].values() if v.get("mem_method")), None)
    if mem:
        lines.append(f"memory: {mem}")
    peak = "-" if out["peak_flops"] is None else f"{out['peak_flops'] / 1e12:.1f} TFLOP/s"
    lines.append(f"MFU peak: {peak} ({out['peak_source']})")
    return "\n".join(lines)


def write_json(path: Path, out: dict[str, Any]) -> None:
    """The whole result, written atomically (a temporary file beside it, then a rename)."""
    atomic_write_text(Path(path), json.dumps(out, indent=2, sort_keys=False) + "\n")
