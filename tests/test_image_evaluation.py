"""`neuromf evaluate` / `verify` with published extractors (tiny files in their layouts) on the tiny demo run."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny_run import build_tiny_run
from test_extractors import save_medicalnet, save_radimagenet

from neuromf.cli import main
from neuromf.evaluation.featurize import held_out_split
from neuromf.spec.schema import EvaluationSpec


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_run(tmp_path_factory)


def _evaluate(args: list[str], out: Path, capsys: pytest.CaptureFixture) -> tuple[dict, str]:
    rc = main(["evaluate", *args, "--nfe", "1", "--out", str(out), "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    return json.loads((out / "evaluation.json").read_text()), printed.out


def test_held_out_split_prefers_test() -> None:
    assert held_out_split(SimpleNamespace(val_names=["a"], test_names=["b", "c"])) == "test"
    assert held_out_split(SimpleNamespace(val_names=["a"], test_names=["b"])) == "val"  # one latent: no FD/MMD
    assert held_out_split(SimpleNamespace(val_names=[], test_names=["b"])) == "test"
    assert held_out_split(SimpleNamespace(val_names=["a"], test_names=[])) == "val"
    assert held_out_split(SimpleNamespace(val_names=["a"])) == "val"


def test_pooled_latent_is_labelled_not_comparable(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    summary, out = _evaluate([str(tiny_run), "--features", "pooled", "--space", "latent"], tmp_path / "pooled", capsys)
    assert summary["extractor"] == {
        "features": "pooled",
        "space": "latent",
        "weights": None,
        "weights_sha256": None,
        "description": summary["extractor"]["description"],
        "comparable_with_literature": False,
    }
    assert summary["n"] == 6 and summary["split"] == "val" and summary["feature_space"]["dim"] == 128
    assert all(r["fd"] > 0 and r["ms_ssim"] is None for r in summary["results"])  # no MS-SSIM of latents
    assert "not comparable with published FIDs" in out


@pytest.mark.parametrize("kind", ["medicalnet3d", "radimagenet2p5d"])
def test_extractor_fid_on_the_demo_images(
    kind: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / ("resnet_50_23dataset.pth" if kind == "medicalnet3d" else "RadImageNet-ResNet50.pt")
    (save_medicalnet if kind == "medicalnet3d" else save_radimagenet)(weights)
    summary, out = _evaluate([str(tiny_run), "--features", kind, "--weights", str(weights)], tmp_path / kind, capsys)
    ex = summary["extractor"]
    assert ex["features"] == kind and ex["space"] == "image" and ex["comparable_with_literature"]
    assert ex["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() and ex["weights"] == str(
        weights.resolve()
    )
    assert summary["n"] == 6 and summary["split"] == "val"
    assert {(r["weights"], r["nfe"]) for r in summary["results"]} == {("ema", 1), ("online", 1)}
    for r in summary["results"] + [summary["reference_floor"]]:
        assert math.isfinite(r["fd"]) and r["fd"] >= 0 and len(r["mmd2"]) == 3
        if kind == "radimagenet2p5d":
            assert set(r["fd_planes"]) == {"xy", "yz", "zx"}
            assert r["fd"] == pytest.approx(sum(r["fd_planes"].values()) / 3)
    for r in summary["results"]:
        assert 0 < r["ms_ssim"] <= 1
    assert 0 < summary["reference_ms_ssim"] <= 1 and summary["ms_ssim_settings"]["pairs"] == 15  # 6 real volumes
    assert f"FID ({kind}, image space)" in out


def test_a_wrong_weights_file_is_one_line_and_writes_nothing(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_radimagenet(tmp_path / "radimagenet.pt")
    out = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            str(tiny_run),
            "--features",
            "medicalnet3d",
            "--weights",
            str(tmp_path / "radimagenet.pt"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert "does not fit the MedicalNet 3D ResNet" in line and "unexpected" in line
    assert not (out / "evaluation.json").exists()
    assert main(["evaluate", str(tiny_run), "--features", "radimagenet2p5d", "--device", "cpu", "--no-progress"]) == 2
    assert "--weights: required" in capsys.readouterr().err


def _with_evaluation_section(run: Path, dest: Path, section: dict, **more: dict) -> Path:
    """A copy of the run whose checkpoints' run-spec carries `section` as its evaluation section (and `more` sections)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "evaluation", ignore_errors=True)
    for ckpt in (dest / "checkpoints").glob("*.pt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state.pop("sha256", None)  # edited here and saved without its digest: loaded unverified, like older files
        state["config"]["evaluation"] = section
        for key, value in more.items():
            state["config"][key].update(value)
        torch.save(state, ckpt)
    return dest


def test_image_space_decodes_through_the_vae_loaded_once(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from neuromf.model.vae import build_vae
    from neuromf.spec.schema import VAESpec

    vae_raw = {
        "decoder": "maisi",
        "num_channels": [8, 16],
        "num_res_blocks": [1, 1],
        "latent_channels": 4,
        "norm_num_groups": 4,
        "scale_factor": 0.5,
    }
    torch.manual_seed(0)
    vae = tmp_path / "vae.pt"
    torch.save({"unet_state_dict": build_vae(VAESpec(**vae_raw)).state_dict()}, vae)
    weights = tmp_path / "resnet_10.pth"
    save_medicalnet(weights)
    run = _with_evaluation_section(
        tiny_run,
        tmp_path / "run",
        {"features": "medicalnet3d", "weights": str(weights)},
        vae=vae_raw,
        paths={"vae_weights": str(vae)},
    )
    with caplog.at_level(logging.INFO, logger="neuromf.model.vae"):
        summary, out = _evaluate([str(run), "--n", "4"], tmp_path / "ev", capsys)
    assert sum("loaded the VAE" in r.getMessage() for r in caplog.records) == 1  # once for all sets
    assert summary["extractor"]["features"] == "medicalnet3d" and summary["feature_space"]["space"] == "image"
    assert all(math.isfinite(r["fd"]) and 0 < r["ms_ssim"] <= 1 for r in summary["results"])
    assert main(["evaluate", str(run), "--space", "latent", "--device", "cpu", "--no-progress"]) == 2
    assert "--space latent: medicalnet3d works on decoded images" in capsys.readouterr().err


def test_verify_says_which_fid_it_used(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "resnet_10.pth"
    save_medicalnet(weights)
    run = _with_evaluation_section(
        tiny_run, tmp_path / "run", {"features": "medicalnet3d", "weights": str(weights), "n": 4}
    )
    main(["verify", str(run), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert "P4-T6 used FID (medicalnet3d, image space)" in out
    t6 = next(t for t in json.loads((run / "verification_report.json").read_text())["tests"] if t["id"] == "P4-T6")
    assert t6["details"]["features"] == "medicalnet3d" and t6["details"]["comparable_with_literature"]
    assert "FID (medicalnet3d, image space)" in (run / "verification_report.md").read_text()

    weights.unlink()  # configured but not staged: the pooled FD, and the report says why
    main(["verify", str(run), "--device", "cpu", "--no-progress", "--re-evaluate"])
    out = capsys.readouterr().out
    assert "P4-T6 used pooled FD (latent space; not comparable with published FIDs)" in out
    report = json.loads((run / "verification_report.json").read_text())
    assert "weights file" in report["evaluation"]["how"] and "is missing" in report["evaluation"]["how"]


def test_periodic_evaluation_logs_a_fid_or_skips_with_a_reason(tiny_run: Path, tmp_path: Path) -> None:
    from neuromf.data.prepare import prepare_data
    from neuromf.evaluation.runs import load_for_eval
    from neuromf.train.periodic_eval import periodic_evaluation

    loaded = load_for_eval(tiny_run)
    spec = loaded.spec.model_copy(deep=True)
    weights = tmp_path / "radimagenet.pt"
    save_radimagenet(weights)
    spec.evaluation = EvaluationSpec(features="radimagenet2p5d", weights=weights, every_n_epochs=1, periodic_n=4)
    data = prepare_data(spec, "cpu", progress=False)
    try:
        net = loaded.network("ema")
        record = periodic_evaluation(spec, net, data, epoch=3, step=12, device=torch.device("cpu"))
        assert record["eval/n"] == 4 and record["epoch"] == 3 and record["step"] == 12
        planes = [record[f"eval/fid_ema_nfe1_{p}"] for p in ("xy", "yz", "zx")]
        assert record["eval/fid_ema_nfe1"] == pytest.approx(sum(planes) / 3) and min(planes) >= 0
        weights.unlink()
        record = periodic_evaluation(spec, net, data, epoch=4, step=16, device=torch.device("cpu"))
        assert "periodic evaluation skipped" in record["event"] and "no such file" in record["event"]
    finally:
        data.close()


def test_evaluation_section_checks() -> None:
    from pydantic import ValidationError

    assert EvaluationSpec().resolved_space == "latent" and EvaluationSpec().every_n_epochs is None  # off by default
    assert EvaluationSpec(features="medicalnet3d", weights=Path("w.pth")).resolved_space == "image"
    with pytest.raises(ValidationError, match="weights: required with features medicalnet3d"):
        EvaluationSpec(features="medicalnet3d")
    with pytest.raises(ValidationError, match="space: radimagenet2p5d works on decoded images"):
        EvaluationSpec(features="radimagenet2p5d", weights=Path("w.pt"), space="latent")
    with pytest.raises(ValidationError):
        EvaluationSpec(extractor="x")  # unknown keys are errors
