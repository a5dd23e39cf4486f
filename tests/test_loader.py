"""The trainer's batch source: split, normalisation, residencies, exact restore of the data order, flips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _latent_data import SHAPE, make_latent, write_latents, write_stats_json

from neuromf.data.meta import LatentMeta
from neuromf.data.prepare import LatentData, TrainBatches, available_host_memory, choose_residency, prepare_data
from neuromf.data.shard import read_shard_info
from neuromf.data.split import split_subjects
from neuromf.errors import UserError
from neuromf.spec import runspec_from_dict
from neuromf.spec.schema import RunSpec

CPU = torch.device("cpu")


def make_spec(base: Path, model: dict[str, Any] | None = None, **data: Any) -> RunSpec:
    raw = {
        "model": {"spatial_size": [16, 16, 16], **(model or {})},
        "data": {"source": "shard", "latent_dir": "lat", **data},
        "paths": {"run_dir": "run"},
        "training": {"seed": 3},
    }
    return runspec_from_dict(raw, base)


@pytest.fixture
def latents(tmp_path: Path) -> dict[str, torch.Tensor]:
    return write_latents(tmp_path / "lat", 22)


def _identify(x: torch.Tensor, data: LatentData, raw: dict[str, torch.Tensor]) -> str:
    """The name of the raw latent that normalised sample x came from (flipped or not)."""
    back = data.stats.denormalise(x)
    return min(
        raw,
        key=lambda n: min(
            float((back - raw[n]).abs().max()), float((back.flip(1 + data.flip_axis) - raw[n]).abs().max())
        ),
    )


@pytest.mark.parametrize("residency", ["host", "stream"])
def test_batches_shape_split_and_normalisation(
    tmp_path: Path, latents: dict[str, torch.Tensor], residency: str
) -> None:
    data = prepare_data(make_spec(tmp_path, residency=residency), CPU, progress=False)
    assert data.residency == residency and data.shape == SHAPE
    split = split_subjects([LatentMeta(n) for n in sorted(latents)], 0.10, 0.05, 42)
    assert (data.train_names, data.val_names, data.test_names) == (split.train, split.val, split.test)
    assert data.shard == tmp_path / "run/data/latents.h5" and read_shard_info(data.shard).n == 22  # packed on demand
    batches = data.train_batches(4)
    assert (batches.batch_size, batches.steps_per_epoch) == (4, 5)  # 20 train latents, drop_last
    seen = []
    for _ in range(batches.steps_per_epoch):
        x = batches.next_batch()
        assert x.shape == (4, *SHAPE) and x.dtype == torch.float32 and x.device == CPU
        for sample in x:
            name = _identify(sample, data, latents)
            assert torch.equal(sample, data.stats.normalise(latents[name]))  # exactly (raw - mean) / std
            seen.append(name)
    assert sorted(seen) == data.train_names  # an epoch visits each training latent once
    everything = data.stats.normalise(torch.stack(list(latents.values())))
    assert everything.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-4  # stats are the whole set's
    assert (everything.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-3
    data.close()


def test_residencies_and_folder_source_give_identical_batches(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    runs = []
    for extra in (
        {"residency": "host"},
        {"residency": "stream"},
        {"source": "folder", "residency": "host"},
        {"source": "folder", "residency": "stream"},
    ):
        data = prepare_data(make_spec(tmp_path, flip_lr=True, **extra), CPU, progress=False)
        batches = data.train_batches(3)
        runs.append([batches.next_batch() for _ in range(14)])  # crosses two epoch boundaries
        runs[-1].append(torch.cat(list(data.val_batches(2))))
        batches.close()
        data.close()
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_residency_argument_overrides_the_spec(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    """What `neuromf evaluate` uses: stream from the shard whatever data.residency says."""
    data = prepare_data(make_spec(tmp_path, residency="host"), CPU, progress=False, residency="stream")
    assert data.residency == "stream" and type(data._train.rows).__name__ == "ShardRows"  # checked (GuardedRows)
    data.close()


@pytest.mark.parametrize("residency", ["host", "stream"])
@pytest.mark.parametrize("flip", [False, True])
def test_saved_order_restores_exactly_the_next_batches(
    tmp_path: Path, latents: dict[str, torch.Tensor], residency: str, flip: bool
) -> None:
    data = prepare_data(make_spec(tmp_path, residency=residency, flip_lr=flip), CPU, progress=False)
    first = data.train_batches(4)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # small and plain: fits in any checkpoint
    assert (state["epoch"], state["position"]) == (1, 2)
    expected = [first.next_batch() for _ in range(9)]
    first.close()

    fresh = prepare_data(make_spec(tmp_path, residency=residency, flip_lr=flip), CPU, progress=False)
    resumed = fresh.train_batches(4)
    unrestored = resumed.next_batch()
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(9)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not torch.equal(unrestored, expected[0])  # the state is what made them equal
    assert (resumed.epoch, resumed.position) == (3, 1)
    resumed.close()


def test_flips_follow_the_axis_and_the_state(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    data = prepare_data(make_spec(tmp_path, flip_lr=True, flip_axis=0, residency="host"), CPU, progress=False)
    batches = data.train_batches(5)
    flipped = kept = 0
    for _ in range(8):
        for sample in batches.next_batch():
            raw = data.stats.normalise(latents[_identify(sample, data, latents)])
            if torch.equal(sample, raw):
                kept += 1
            else:
                assert torch.equal(sample, raw.flip(1))  # axis 0 = D = dim 1 of (C, D, H, W)
                flipped += 1
    assert flipped > 5 and kept > 5


def test_epochs_reshuffle_and_ranks_split_the_global_batch(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    data = prepare_data(make_spec(tmp_path, residency="host", flip_lr=True), CPU, progress=False)
    one = data.train_batches(4)
    epoch0 = [one.next_batch() for _ in range(5)]
    assert (one.epoch, one.position) == (0, 5)
    epoch1 = [one.next_batch() for _ in range(5)]
    assert (one.epoch, one.position) == (1, 5)
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    ranks = [data.train_batches(2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == 5
    for p in range(5):
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), epoch0[p])


def test_val_batches_fixed_order_no_drop(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    data = prepare_data(make_spec(tmp_path, val_fraction=0.35, residency="stream"), CPU, progress=False)
    assert len(data.val_names) == 7
    val = data.val_batches(3)
    first = list(val)
    assert [len(x) for x in first] == [3, 3, 1] and len(val) == 3 and val.n_samples == 7
    stacked = torch.cat(first)
    for i, name in enumerate(data.val_names):  # sorted names, no shuffle
        assert torch.equal(stacked[i], data.stats.normalise(latents[name]))
    assert torch.equal(torch.cat(list(val)), stacked)
    halves = [torch.cat(list(data.val_batches(3, rank=r, world_size=2))) for r in range(2)]
    assert torch.equal(halves[0], stacked[0::2]) and torch.equal(halves[1], stacked[1::2])


def test_stale_shard_is_repacked(
    tmp_path: Path, latents: dict[str, torch.Tensor], capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_spec(tmp_path)
    prepare_data(spec, CPU, progress=False).close()
    assert "it does not exist yet" in capsys.readouterr().err
    before = read_shard_info(tmp_path / "run/data/latents.h5").content_sha256
    prepare_data(spec, CPU, progress=False).close()
    assert "packing" not in capsys.readouterr().err  # fresh: not packed again
    torch.save(make_latent(123), tmp_path / "lat" / "sub-004.pt")
    data = prepare_data(spec, CPU, progress=False)
    assert "changed since it was packed" in capsys.readouterr().err
    assert read_shard_info(data.shard).content_sha256 != before


def test_statistics_sources(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    with pytest.raises(UserError, match="latent_stats.json: no such file"):
        prepare_data(make_spec(tmp_path, stats="file"), CPU, progress=False)
    write_stats_json(tmp_path / "lat", [1, 2, 3, 4], [5, 6, 7, 8])
    with pytest.raises(UserError, match="beyond 10 %"):  # far off the data: refused unless asked to warn only
        prepare_data(make_spec(tmp_path, stats="file"), CPU, progress=False)
    data = prepare_data(make_spec(tmp_path, stats="file", stats_mismatch="warn"), CPU, progress=False)
    assert data.stats.mean.tolist() == [1, 2, 3, 4] and data.stats.std.tolist() == [5, 6, 7, 8]
    data = prepare_data(make_spec(tmp_path, normalise=False), CPU, progress=False)
    x = data.train_batches(2).next_batch()
    assert any(torch.equal(x[0], t) for t in latents.values())  # raw values


def test_user_errors(tmp_path: Path, latents: dict[str, torch.Tensor]) -> None:
    with pytest.raises(UserError, match=r"model.spatial_size: the latents are .* \[4, 16, 16, 16\]"):
        prepare_data(make_spec(tmp_path, model={"spatial_size": [24, 24, 24]}), CPU, progress=False)
    data = prepare_data(make_spec(tmp_path), CPU, progress=False)
    with pytest.raises(UserError, match="fewer than one batch"):
        data.train_batches(21)
    state = data.train_batches(4).state_dict()
    with pytest.raises(UserError, match="batch_size was 4, now 5"):
        data.train_batches(5).load_state_dict(state)
    with pytest.raises(UserError, match="does not exist, and data.latent_dir is not set"):
        prepare_data(make_spec(tmp_path, latent_dir=None, shard="missing.h5"), CPU, progress=False)
    torch.save(torch.zeros(3), tmp_path / "lat" / "bad.pt")
    with pytest.raises(UserError, match="bad.pt: shape"):
        prepare_data(make_spec(tmp_path, source="folder"), CPU, progress=False)


def test_residency_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert available_host_memory() > 1 << 28
    assert choose_residency("auto", 2 << 30, CPU) == "host"
    assert choose_residency("device", 2 << 30, CPU) == "host"  # the CPU's memory is the host's
    assert choose_residency("stream", 1, CPU) == "stream"
    assert choose_residency("auto", 1 << 50, CPU) == "stream"
    assert capsys.readouterr().err == ""
    assert choose_residency("host", 1 << 50, CPU) == "host"  # asked for: honoured, with a warning
    assert "data.residency host: the data need" in capsys.readouterr().err


def test_demo_source_builds_packs_and_loads(tmp_path: Path) -> None:
    raw = {
        "model": {"spatial_size": [16, 16, 16]},
        "data": {"source": "demo", "demo": {"n_volumes": 6, "size": 16}},
        "paths": {"run_dir": "run"},
    }
    data = prepare_data(runspec_from_dict(raw, tmp_path), CPU, progress=False)
    assert len(data.train_names) + len(data.val_names) == 6 and data.shard == tmp_path / "run/data/latents.h5"
    assert data.train_batches(2).next_batch().shape == (2, 4, 16, 16, 16)
    assert isinstance(data.train_batches(2), TrainBatches)
