"""The run-spec: shipped specs validate, bad input gives exit 2 with the field path, references and paths resolve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from neuromf.cli import main
from neuromf.spec import RunSpec, dump_runspec, load_runspec
from neuromf.spec.loader import SpecError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "runspecs" / "demo.yaml", REPO / "runspecs" / "picasso.yaml"]


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry in a subprocess: exit codes and stderr as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "neuromf", *argv], capture_output=True, text=True, cwd=cwd or REPO, timeout=120
    )


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.name)
def test_shipped_runspecs_validate(spec: Path) -> None:
    result = run_cli("validate", str(spec))
    assert result.returncode == 0, result.stderr
    assert "run-spec OK" in result.stdout
    assert "M parameters" in result.stdout


def test_picasso_has_the_correct_not_the_stale_values() -> None:
    spec = load_runspec(SHIPPED[1])
    assert (spec.time_sampling.mu, spec.time_sampling.sigma) == (-0.4, 1.0)
    assert spec.time_sampling.data_proportion == 0.25 and spec.time_sampling.t_min == 0.001
    assert spec.meanflow.denominator_floor == 0.05 and spec.meanflow.norm_eps == 0.01
    assert spec.training.weight_decay == 0.0 and spec.training.warmup_steps == 5000
    assert spec.training.max_epochs == 500 and spec.training.batch_size == 24
    assert spec.ema.decay == 0.999 and spec.ema.half_lives is None
    assert spec.data.latent_dir == Path("/mnt/home/users/tic_163_uma/mpascual/execs/neuromf/results/latents")
    assert spec.paths.vae_weights is not None and spec.paths.vae_weights.name == "autoencoder_v2.pt"


def test_defaults_are_the_corrected_values() -> None:
    spec = RunSpec()
    assert spec.time_sampling.mu == -0.4 and spec.training.weight_decay == 0.0
    assert spec.training.warmup_steps == 5000 and spec.meanflow.norm_eps == 0.01


def test_schema_is_valid_json_schema_and_accepts_both_specs() -> None:
    result = run_cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in SHIPPED:
        resolved = yaml.safe_load(dump_runspec(load_runspec(path)))
        jsonschema.validate(resolved, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"training": {"lr": "fast"}}, schema)


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.name)
def test_show_round_trips(spec: Path, tmp_path: Path) -> None:
    result = run_cli("show", str(spec))
    assert result.returncode == 0, result.stderr
    shown = write(tmp_path, result.stdout)
    assert load_runspec(shown) == load_runspec(spec)


BAD_INPUTS = {
    "unknown key": ("training:\n  lr: 1.0e-4\n  colour: blue\n", "training.colour: unknown key"),
    "misspelt key": ("trainig:\n  lr: 1.0e-4\n", "trainig: unknown key; did you mean 'training'?"),
    "misspelt nested key": ("model:\n  chanels: [8, 16]\n", "model.chanels: unknown key; did you mean 'channels'?"),
    "wrong type": ("training:\n  batch_size: many\n", "training.batch_size: Input should be a valid integer"),
    "out of range": ("time_sampling:\n  t_min: 1.5\n", "time_sampling.t_min: Input should be less than 1"),
    "data_proportion": ("time_sampling:\n  data_proportion: -0.1\n", "time_sampling.data_proportion:"),
    "renamed key": ("meanflow:\n  t_min: 0.1\n", "meanflow.t_min: renamed: use meanflow.denominator_floor"),
    "inconsistent lists": (
        "model:\n  channels: [8, 16, 32, 64]\n  attention_levels: [false, true]\n  norm_num_groups: 4\n",
        "model.attention_levels: has 2 entries but channels has 4",
    ),
    "norm groups": ("model:\n  channels: [12, 16, 32, 64]\n  norm_num_groups: 8\n", "model.channels: 12 (level 0)"),
    "one channel per group": (
        "model:\n  channels: [8, 16, 32, 64]\n  norm_num_groups: 8\n",
        "model.norm_num_groups: 8 groups for the 8 channels of level 0 is one channel per group",
    ),
    "spatial size": (
        "model:\n  spatial_size: [20, 24, 24]\n  channels: [8, 16, 32, 64]\n  norm_num_groups: 4\n"
        "  num_head_channels: [0, 0, 8, 8]\ndata:\n  source: folder\n  latent_dir: x\n",
        "model.spatial_size: [20, 24, 24] has D = 20, not divisible by the UNet's total downsampling 8",
    ),
    "warmup": ("training:\n  warmup_steps: 100\n  max_steps: 50\n", "training.warmup_steps: 100 must be shorter"),
    "fp16": ("training:\n  precision: fp16\n", "training.precision: fp16 gives NaN"),
    "batch size": ("training:\n  batch_size: 0\n", "training.batch_size: Input should be greater than or equal to 1"),
    "list for mapping": ("training:\n  - lr\n", "training: expected a mapping"),
    "yaml syntax": ("training:\n  lr: [1, 2\n", "YAML syntax error at line"),
    "empty file": ("", "the file is empty"),
    "top-level list": ("- a\n- b\n", "expected a mapping of sections"),
    "demo size mismatch": (
        "model:\n  spatial_size: [16, 16, 16]\ndata:\n  source: demo\n  demo:\n    size: 32\n",
        "model.spatial_size: [16, 16, 16] differs",
    ),
    "bf16 on cpu": (
        "training:\n  precision: bf16\nhardware:\n  device: cpu\n",
        "training.precision: bf16 on hardware.device cpu",
    ),
    "unknown reference": ("paths:\n  run_dir: ${paths.nowhere}/x\n", "paths.run_dir: ${paths.nowhere} refers to"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_bad_input_exit_2_with_field_path(case: str, tmp_path: Path) -> None:
    text, expected = BAD_INPUTS[case]
    result = run_cli("validate", str(write(tmp_path, text)))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_every_problem_is_reported_once_per_line(tmp_path: Path) -> None:
    spec = write(tmp_path, "training:\n  lr: -1\n  batch_size: 0\nema:\n  decay: 2\n")
    result = run_cli("validate", str(spec))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["training.lr", "training.batch_size", "ema.decay"]


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    result = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("validate", str(tmp_path))
    assert result.returncode == 2 and "is a folder" in result.stderr
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    result = run_cli("validate", str(binary))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_overrides_are_yaml_typed_and_validated(tmp_path: Path) -> None:
    spec = load_runspec(SHIPPED[0], ["training.lr=2e-4", "model.channels=[16,16,32,64]", "training.compile=true"])
    assert spec.training.lr == 2e-4 and spec.model.channels == [16, 16, 32, 64] and spec.training.compile is True
    for bad, expected in [
        ("training.lr=abc", "training.lr: Input should be a valid number"),
        ("training", "--set training: expected KEY=VALUE"),
        ("training.lr.x=1", "training.lr: --set training.lr.x goes through a value that is not a mapping"),
        ("traning.lr=1", "traning: unknown key; did you mean 'training'?"),
    ]:
        result = run_cli("validate", str(SHIPPED[0]), "--set", bad)
        assert result.returncode == 2 and expected in result.stderr, (bad, result.stderr)


def test_references_expand_environment_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROMF_TEST_SCRATCH", "/scratch/me")
    spec = write(
        tmp_path,
        "paths:\n  results_root: ${NEUROMF_TEST_SCRATCH}/results\n  run_dir: ${paths.results_root}/run1\n"
        "  vae_weights: ${paths.checkpoints_root}/vae.pt\n  checkpoints_root: /ckpt\n"
        "data:\n  source: shard\n  latent_dir: ${paths.results_root}/latents\n",
    )
    loaded = load_runspec(spec)
    assert loaded.paths.run_dir == Path("/scratch/me/results/run1")
    assert loaded.data.latent_dir == Path("/scratch/me/results/latents")
    assert loaded.paths.vae_weights == Path("/ckpt/vae.pt")
    monkeypatch.delenv("NEUROMF_TEST_SCRATCH")
    with pytest.raises(SpecError, match="environment variable NEUROMF_TEST_SCRATCH .* is not set"):
        load_runspec(spec)


def test_circular_reference_is_an_error(tmp_path: Path) -> None:
    spec = write(tmp_path, "paths:\n  results_root: ${paths.run_dir}/a\n  run_dir: ${paths.results_root}/b\n")
    with pytest.raises(SpecError, match="circular reference"):
        load_runspec(spec)


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    spec = write(tmp_path / "specs", "paths:\n  run_dir: ../runs/x\n  vae_weights: ~/vae.pt\n")
    other_cwd = tmp_path / "elsewhere"
    other_cwd.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(other_cwd)
        loaded = load_runspec(Path("..") / "specs" / "spec.yaml")
    finally:
        os.chdir(cwd)
    assert loaded.paths.run_dir == tmp_path / "runs" / "x"
    assert loaded.paths.vae_weights == Path.home() / "vae.pt"
    assert spec.exists()


def test_check_paths_reports_missing_inputs_and_unwritable_outputs(tmp_path: Path) -> None:
    result = run_cli("validate", str(SHIPPED[1]), "--check-paths")
    assert result.returncode == 2
    assert "data.latent_dir:" in result.stderr and "paths.vae_weights:" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_summary_counts_steps_when_data_is_known(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(SHIPPED[0])]) == 0
    out = capsys.readouterr().out
    assert "steps per epoch" in out and "latents ->" in out


def test_validate_summary_splits_the_global_batch_over_gpus_and_accumulation(capsys: pytest.CaptureFixture) -> None:
    args = [
        "--set",
        "training.batch_size=24",
        "--set",
        "training.accumulate_grad_batches=3",
        "--set",
        "hardware.gpus_per_node=2",
    ]
    assert main(["validate", str(SHIPPED[0]), *args]) == 0
    assert "24 latents per optimizer step = 2 GPUs x 3 accumulated x micro-batch 4" in capsys.readouterr().out


def test_batch_larger_than_the_data_is_caught_before_training(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(SHIPPED[0]), "--set", "training.batch_size=512"]) == 2
    assert "training.batch_size: 512 is larger than the training split" in capsys.readouterr().err


def test_every_verb_has_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    verbs = [v for v in ["validate", "show", "schema"] if v in result.stdout]
    assert verbs == ["validate", "show", "schema"]
    for verb in verbs:
        assert run_cli(verb, "--help").returncode == 0


def test_launch_info_prints_what_the_slurm_scripts_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from neuromf.spec.launch_info import main as launch_info

    latents = tmp_path / "latents"
    latents.mkdir()
    args = [
        str(SHIPPED[0]),
        "--set",
        f"paths.run_dir={tmp_path / 'run'}",
        "--set",
        "data.source=shard",
        "--set",
        f"data.latent_dir={latents}",
        "--set",
        "hardware.gpus_per_node=2",
    ]
    assert launch_info(args) == 0
    lines = capsys.readouterr().out.splitlines()
    info = dict(line.split(": ", 1) for line in lines if not line.startswith("neuromf-bind:"))
    binds = [line.split(": ", 1)[1] for line in lines if line.startswith("neuromf-bind:")]
    assert info["neuromf-run_dir"] == str(tmp_path / "run")
    assert info["neuromf-cache_dir"] == str(tmp_path / "run" / "cache" / "torchinductor")
    assert info["neuromf-shard_dir"] == str(tmp_path / "run" / "data")
    assert (info["neuromf-nodes"], info["neuromf-gpus_per_node"]) == ("1", "2")
    assert binds == [str(SHIPPED[0].parent), str(latents)]  # existing inputs only: the shard's folder is not there yet
    assert launch_info([str(SHIPPED[0]), "--set", "training.lr=fast"]) == 2
    assert capsys.readouterr().err.startswith("training.lr: ")
