"""`neuromf sample` and `neuromf evaluate`: features and distances against direct numpy/scipy computations,
FD/MMD behaviour on real demo latents, the files of both commands on a real tiny run, and bad input (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from _tiny_run import build_tiny_run
from PIL import Image

from neuromf.cli import main
from neuromf.data.demo import build_demo_dataset
from neuromf.data.latents import read_latent
from neuromf.evaluation.features import FeatureSpec, feature_names, latent_features
from neuromf.evaluation.generate import sample_noise
from neuromf.evaluation.metrics import (
    MomentAccumulator,
    frechet_distance,
    histogram_overlap,
    mean_pairwise_distance,
    median_pairwise_distance,
    mmd2_rbf,
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_latents(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """32 demo latents at 16^3, normalised per channel: (32, 4, 16, 16, 16)."""
    folder = build_demo_dataset(tmp_path_factory.mktemp("demo32") / "d", n_volumes=32, size=16, seed=1)
    x = torch.stack([read_latent(p).float() for p in sorted(folder.glob("*.pt"))])
    mean = x.mean(dim=(0, 2, 3, 4), keepdim=True)
    std = x.std(dim=(0, 2, 3, 4), keepdim=True)
    return (x - mean) / std


# ---------------------------------------------------------------- features and metrics vs direct computations


def _numpy_features(x: np.ndarray, levels: tuple[int, ...], grid: int) -> np.ndarray:
    """The feature definition written out with reshapes (sizes divisible by level * grid)."""

    def pool(a: np.ndarray, k: int) -> np.ndarray:
        b, c, d, h, w = a.shape
        return a.reshape(b, c, d // k, k, h // k, k, w // k, k).mean(axis=(3, 5, 7))

    def cells(a: np.ndarray) -> np.ndarray:  # (B, C, grid^3, voxels per cell)
        b, c, d, h, w = a.shape
        s = (d // grid, h // grid, w // grid)
        a = a.reshape(b, c, grid, s[0], grid, s[1], grid, s[2]).transpose(0, 1, 2, 4, 6, 3, 5, 7)
        return a.reshape(b, c, grid**3, -1)

    blocks = [cells(x).mean(-1)]
    for level in levels:
        blocks.append(cells(pool(x, level) if level > 1 else x).std(-1))
    return np.concatenate([blk.reshape(x.shape[0], -1) for blk in blocks], axis=1)


def test_features_match_a_direct_numpy_computation() -> None:
    x = torch.randn(3, 4, 16, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 0.5
    spec = FeatureSpec(levels=(1, 2, 4), grid=2)
    got = latent_features(x, spec).numpy()
    want = _numpy_features(x.numpy(), spec.levels, spec.grid)
    assert got.shape == (3, spec.dim(4)) == (3, 128) and len(feature_names(4, spec)) == 128
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert latent_features(x.float(), spec).dtype == torch.float64
    with pytest.raises(ValueError, match="too small"):
        latent_features(torch.zeros(1, 4, 4, 4, 4), spec)


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean)))


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(80, 6)) @ rng.normal(size=(6, 6)) + 0.7
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    # univariate check by hand: (m1 - m2)^2 + (s1 - s2)^2
    u, v = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-1.0, 0.5, size=(400, 1))
    want = (u.mean() - v.mean()) ** 2 + (u.std(ddof=1) - v.std(ddof=1)) ** 2
    assert frechet_distance(u, v) == pytest.approx(want, rel=1e-9)
    # fewer samples than features: singular covariances still give a finite, non-negative value close to scipy's
    small_a, small_b = a[:4], b[:4]
    assert 0 <= frechet_distance(small_a, small_b) == pytest.approx(_scipy_fd(small_a, small_b), rel=1e-5, abs=1e-6)


def test_mmd_matches_a_direct_double_loop() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    bandwidths = [0.5, 1.0, 2.5]
    got = mmd2_rbf(x, y, bandwidths)

    def k(a: np.ndarray, b: np.ndarray, s: float) -> float:
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * s * s)))

    for s in bandwidths:
        xx = sum(k(x[i], x[j], s) for i in range(7) for j in range(7) if i != j) / (7 * 6)
        yy = sum(k(y[i], y[j], s) for i in range(9) for j in range(9) if i != j) / (9 * 8)
        xy = sum(k(x[i], y[j], s) for i in range(7) for j in range(9)) / (7 * 9)
        assert got[s] == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    d = [np.linalg.norm(x[i] - x[j]) for i in range(7) for j in range(i + 1, 7)]
    assert median_pairwise_distance(x) == pytest.approx(float(np.median(d)), rel=1e-10)


def test_moments_match_scipy_over_batches() -> None:
    rng = np.random.default_rng(2)
    x = (
        np.concatenate([rng.gamma(2.0, 1.5, size=(5, 1, 6, 6, 6)), rng.normal(3.0, 0.2, size=(5, 1, 6, 6, 6))], axis=1)
        + 100.0
    )
    acc = MomentAccumulator()
    for part in np.split(x, [2, 3]):  # uneven batches
        acc.update(torch.from_numpy(part).float())
    got = acc.result()
    xf = x.astype(np.float32).astype(np.float64)
    for c in range(2):
        v = xf[:, c].ravel()
        assert got[c]["mean"] == pytest.approx(v.mean(), rel=1e-9)
        assert got[c]["std"] == pytest.approx(v.std(), rel=1e-6)
        assert got[c]["skewness"] == pytest.approx(scipy.stats.skew(v), rel=1e-5, abs=1e-6)
        assert got[c]["kurtosis"] == pytest.approx(scipy.stats.kurtosis(v), rel=1e-5, abs=1e-6)
    assert got[0]["skewness"] > 0.5  # the gamma channel is skewed; the normal one is not
    assert abs(got[1]["skewness"]) < 0.2


def test_diversity_and_histogram_overlap() -> None:
    x = torch.randn(6, 2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    flat = x.reshape(6, -1).double()
    want = np.mean(
        [float((flat[i] - flat[j]).norm()) / flat.shape[1] ** 0.5 for i in range(6) for j in range(i + 1, 6)]
    )
    assert mean_pairwise_distance(x) == pytest.approx(want, rel=1e-9)
    assert mean_pairwise_distance(x[:1].expand(5, -1, -1, -1, -1)) == pytest.approx(0.0, abs=1e-6)  # mode collapse
    assert histogram_overlap(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(1.0)
    assert histogram_overlap(np.array([1, 0]), np.array([0, 1])) == 0.0


def test_fd_and_mmd_of_data_against_itself_are_near_zero_and_against_noise_large(demo_latents: torch.Tensor) -> None:
    feats = latent_features(demo_latents).numpy()
    noise = latent_features(torch.randn(demo_latents.shape, generator=torch.Generator().manual_seed(4))).numpy()
    half_a, half_b = feats[:16], feats[16:]
    bw = [f * median_pairwise_distance(half_a) for f in (0.5, 1.0, 2.0)]

    assert frechet_distance(feats, feats) < 1e-8
    fd_real, fd_noise = frechet_distance(half_a, half_b), frechet_distance(half_a, noise[:16])
    assert fd_noise > 10 * fd_real, (fd_real, fd_noise)

    mmd_self = mmd2_rbf(feats, feats, bw)
    mmd_real, mmd_noise = mmd2_rbf(half_b, half_a, bw), mmd2_rbf(noise[:16], half_a, bw)
    for s in bw:
        assert abs(mmd_self[s]) < 0.1
        assert mmd_noise[s] > 0.5 and mmd_noise[s] > 10 * abs(mmd_real[s]), (s, mmd_real[s], mmd_noise[s])


def test_sample_noise_depends_only_on_seed_and_index() -> None:
    a = sample_noise(7, 0, 5, (2, 3, 3, 3))
    b = torch.cat([sample_noise(7, 0, 2, (2, 3, 3, 3)), sample_noise(7, 2, 3, (2, 3, 3, 3))])
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise(8, 0, 5, (2, 3, 3, 3)))


# ---------------------------------------------------------------- `neuromf sample`


def test_sample_writes_latents_volumes_and_one_grid_per_nfe(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "samples"
    ckpt = tiny_run / "checkpoints" / "latest.pt"
    rc = main(
        [
            "sample",
            str(ckpt),
            "--n",
            "3",
            "--nfe",
            "1,2",
            "--seed",
            "5",
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    for k in (1, 2):
        z = torch.load(out / f"ema_nfe{k}_latents.pt", weights_only=True)
        assert z.shape == (3, 4, 16, 16, 16) and z.dtype == torch.float32 and torch.isfinite(z).all()
        grid = Image.open(out / f"ema_nfe{k}_grid.png")
        assert grid.height > 3 * 100  # three rows of enlarged panels
        vols = sorted(out.glob(f"ema_nfe{k}_sample_*.nii.gz"))
        assert len(vols) == 3
        img = nib.load(vols[0])
        assert img.shape == (16, 16, 16, 4)  # identity decoder: the 4-channel latent itself
        np.testing.assert_allclose(np.moveaxis(img.get_fdata(dtype=np.float32), -1, 0), z[0].numpy(), rtol=1e-6)
    assert not torch.equal(torch.load(out / "ema_nfe1_latents.pt"), torch.load(out / "ema_nfe2_latents.pt"))
    info = json.loads((out / "sample_info.json").read_text())
    assert info["n"] == 3 and info["nfe"] == [1, 2] and info["weights"] == "ema" and info["global_step"] == 12

    # sample i depends on (seed, i) only: a second call with another batch size gives the same first two samples
    out2 = tmp_path / "again"
    assert (
        main(
            [
                "sample",
                str(tiny_run),
                "--n",
                "2",
                "--nfe",
                "1",
                "--seed",
                "5",
                "--out",
                str(out2),
                "--batch-size",
                "1",
                "--weights",
                "online",
                "--no-volumes",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert not list(out2.glob("*.nii.gz"))
    online = torch.load(out2 / "online_nfe1_latents.pt")
    assert online.shape == (2, 4, 16, 16, 16)
    assert not torch.allclose(online, torch.load(out / "ema_nfe1_latents.pt")[:2])  # EMA differs from online weights


def test_sample_is_deterministic_across_batch_sizes(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = str(tiny_run / "checkpoints" / "latest.pt")
    for bs, name in ((3, "a"), (1, "b")):
        assert (
            main(
                [
                    "sample",
                    ckpt,
                    "--n",
                    "3",
                    "--nfe",
                    "1",
                    "--out",
                    str(tmp_path / name),
                    "--batch-size",
                    str(bs),
                    "--no-volumes",
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )
    a, b = (torch.load(tmp_path / n / "ema_nfe1_latents.pt") for n in "ab")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- `neuromf evaluate`


def test_evaluate_writes_json_and_histograms(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "eval.json"
    rc = main(
        [
            "evaluate",
            str(tiny_run),
            "--nfe",
            "1,2",
            "--json",
            str(out_json),
            "--out",
            str(tmp_path / "ev"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    summary = json.loads(out_json.read_text())
    assert summary == json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert Path(summary["checkpoint"]).name == "best.pt"  # a run folder: best.pt first
    assert summary["n"] == 6 and summary["reference"] == "val"  # the whole validation split by default
    assert summary["feature_space"]["dim"] == 128 and len(summary["mmd_bandwidths"]) == 3
    pairs = {(r["weights"], r["nfe"]) for r in summary["results"]}
    assert pairs == {("ema", 1), ("ema", 2), ("online", 1), ("online", 2)}
    for r in summary["results"]:
        assert r["fd"] > 0 and len(r["mmd2"]) == 3 and r["diversity"] > 0
        assert len(r["moments"]) == 4 and all(set(m) == {"mean", "std", "skewness", "kurtosis"} for m in r["moments"])
        assert all(0 <= o <= 1 for o in r["histogram_overlap"])
    assert summary["reference_floor"]["n"] == 6 and summary["reference_floor"]["fd"] >= 0
    assert len(summary["training_moments"]) == 4 and summary["n_train_stats"] == 16  # whole batches of 4 from 18
    assert set(summary["ema_better_fd"]) == {"1", "2"}
    hist = Image.open(tmp_path / "ev" / "latent_histograms.png")
    assert hist.width >= 2 * 300 and hist.height >= 4 * 200  # channels x NFEs panels
    assert "FD(EMA)" in printed.out and "online" in printed.out


def test_evaluate_refuses_n_larger_than_the_reference(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(tiny_run), "--n", "7", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--n 7: larger than possible" in err and "has 6 latents" in err and "Traceback" not in err


def _bad_inputs(tiny_run: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    state = torch.load(tiny_run / "checkpoints" / "latest.pt", weights_only=True)
    del state["sha256"]  # edited below and saved without its digest: loaded unverified, like older files
    state["config"]["model"]["channels"] = [16, 32, 64, 128]  # weights no longer fit the network it names
    wrong = tmp_path / "incompatible.pt"
    torch.save(state, wrong)
    state["config"]["model"]["no_such_field"] = 1  # a run-spec this version does not accept
    invalid = tmp_path / "invalid_spec.pt"
    torch.save(state, invalid)
    out = str(tmp_path / "o")
    return {
        "not a run": (["evaluate", str(not_a_run)], "not a NeuroMF run folder"),
        "missing": (["sample", str(tmp_path / "nope.pt"), "--n", "1", "--out", out], "no such file or folder"),
        "garbage": (["sample", str(garbage), "--n", "1", "--out", out], "cannot be loaded as a NeuroMF checkpoint"),
        "incompatible": (["evaluate", str(wrong)], "keys of the wrong shape"),
        "invalid spec": (["sample", str(invalid), "--n", "1", "--out", out], "does not validate with this version"),
        "n zero": (["sample", str(tiny_run), "--n", "0", "--out", out], "--n 0: must be at least 1"),
        "n one": (["evaluate", str(tiny_run), "--n", "1"], "at least 2 samples"),
    }


@pytest.mark.parametrize("case", ["not a run", "missing", "garbage", "incompatible", "invalid spec", "n zero", "n one"])
def test_bad_input_is_a_clear_error_with_exit_2(
    case: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, message = _bad_inputs(tiny_run, tmp_path)[case]
    assert main(argv + ["--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_bad_nfe_is_a_usage_error(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["sample", str(tiny_run), "--n", "1", "--nfe", "0,1", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "NFE must be an integer >= 1" in capsys.readouterr().err


def test_evaluate_uses_a_moved_run(tiny_run: Path, tmp_path: Path) -> None:
    """The checkpoint's paths point at the old folder; the loader follows the run to where it is now."""
    import shutil

    from neuromf.evaluation.runs import find_checkpoint, load_for_eval

    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)
    loaded = load_for_eval(moved)
    assert loaded.path == moved / "checkpoints" / "best.pt" and loaded.spec.paths.run_dir == moved.resolve()
    assert loaded.spec.data.shard == moved.resolve() / "latents.h5"  # data inside the run folder moved with it
    assert loaded.spec.data.latent_dir == load_for_eval(tiny_run).spec.data.latent_dir  # data outside it did not
    assert find_checkpoint(moved / "checkpoints" / "latest.pt") == (moved / "checkpoints" / "latest.pt", moved)


def test_a_checkpoint_saved_with_meanflow_t_min_still_samples_and_resumes(tiny_run: Path, tmp_path: Path) -> None:
    """Checkpoints written before meanflow.t_min was renamed meanflow.denominator_floor: read with the new name."""
    from neuromf.evaluation.runs import load_for_eval
    from neuromf.train.resume import check_compatible, load_named

    state = torch.load(tiny_run / "checkpoints" / "latest.pt", weights_only=True)
    del state["sha256"]  # edited below and saved without its digest: loaded unverified, like older files
    meanflow = state["config"]["meanflow"]
    del meanflow["denominator_floor"]
    meanflow["t_min"] = 0.2
    old = tmp_path / "old.pt"
    torch.save(state, old)
    loaded = load_for_eval(old)
    assert loaded.spec.meanflow.denominator_floor == 0.2
    out = tmp_path / "o"
    assert (
        main(["sample", str(old), "--n", "1", "--nfe", "2", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    )
    assert (out / "ema_nfe2_latents.pt").is_file()
    check_compatible(load_for_eval(tiny_run).spec, old, load_named(old, torch.device("cpu")))  # --resume accepts it


def test_sample_decodes_through_the_vae_of_the_run_spec(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run-spec with vae.decoder maisi: volumes are the VAE's decode of z / scale_factor (a tiny saved VAE)."""
    from neuromf.model.vae import build_vae, decode_latents
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
    weights = tmp_path / "vae.pt"
    torch.save({"unet_state_dict": build_vae(VAESpec(**vae_raw)).state_dict()}, weights)
    state = torch.load(tiny_run / "checkpoints" / "latest.pt", weights_only=True)
    del state["sha256"]  # edited below and saved without its digest: loaded unverified, like older files
    state["config"]["vae"] = vae_raw
    state["config"]["paths"]["vae_weights"] = str(weights)
    ckpt = tmp_path / "with_vae.pt"
    torch.save(state, ckpt)

    out = tmp_path / "decoded"
    assert (
        main(["sample", str(ckpt), "--n", "2", "--nfe", "1", "--out", str(out), "--device", "cpu", "--no-progress"])
        == 0
    )
    z = torch.load(out / "ema_nfe1_latents.pt")
    vol = nib.load(out / "ema_nfe1_sample_01.nii.gz").get_fdata(dtype=np.float32)
    assert vol.shape == (32, 32, 32)  # two VAE levels: x2 per axis, one output channel
    want = decode_latents(z[1:2], VAESpec(**vae_raw), weights, "cpu")[0, 0].numpy()
    np.testing.assert_allclose(vol, want, rtol=1e-5, atol=1e-6)

    state["config"]["paths"]["vae_weights"] = None
    torch.save(state, ckpt)
    assert (
        main(["sample", str(ckpt), "--n", "1", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]) == 2
    )
    assert "paths.vae_weights: not set" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["tpu", "nonsense"])
def test_an_unknown_device_is_a_clear_error(
    device: str, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["sample", str(tiny_run), "--n", "1", "--out", str(tmp_path / "o"), "--device", device]) == 2
    assert f"--device {device}: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
