"""`neuromf bench`: speed, memory, FLOPs and MFU of training steps, and side-by-side comparisons.

    from neuromf.bench import BenchOptions, bench, format_table, write_json
    out = bench(spec, BenchOptions(steps=10, variants=["naive", "eager", "compiled", "fm", "fm_compiled"]))

See neuromf/bench/run.py for what runs (neuromf/bench/variant.py: one variant), neuromf/bench/measure.py for how it is
measured, and docs/benchmarks.md for the numbers.
"""

from neuromf.bench.report import format_table, ratios_and_targets, write_json
from neuromf.bench.run import BenchOptions, bench, default_variants
from neuromf.bench.variant import VARIANTS

__all__ = ["BenchOptions", "VARIANTS", "bench", "default_variants", "format_table", "ratios_and_targets", "write_json"]
