"""Where compile and config caches go: an explicit paths.cache_dir wins over the image's environment; otherwise a
writable folder from the environment is kept, and an unwritable one is replaced by a per-user folder under /tmp."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuromf.errors import UserError
from neuromf.spec import runspec_from_dict
from neuromf.train.runtime import configure_caches, user_tmp

NAMES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def restore_env() -> Iterator[None]:
    saved = dict(os.environ)
    for name in NAMES:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def spec(tmp_path: Path, cache_dir: Path | None = None):  # type: ignore[no-untyped-def]
    paths = {"run_dir": str(tmp_path / "run")}
    if cache_dir is not None:
        paths["cache_dir"] = str(cache_dir)
    return runspec_from_dict({"paths": paths}, base_dir=tmp_path)


def test_explicit_cache_dir_wins_over_the_environment(tmp_path: Path) -> None:
    image = tmp_path / "image_cache"  # what the image's ENV names
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(image / "torchinductor"), TRITON_CACHE_DIR=str(image / "triton"))
    configure_caches(spec(tmp_path, tmp_path / "bound"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "bound")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "bound" / "triton")
    assert (tmp_path / "bound" / "triton").is_dir()


def test_writable_environment_kept_unwritable_replaced_per_user(tmp_path: Path) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    os.environ["TRITON_CACHE_DIR"] = "/proc/no/such/folder"  # cannot be created, even by root
    configure_caches(spec(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine" / "triton")
    assert os.environ["MPLCONFIGDIR"] == str(user_tmp() / "matplotlib")
    assert os.environ["XDG_CACHE_HOME"] == str(user_tmp() / "cache")
    assert user_tmp().name == f"neuromf-{os.getuid()}"

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = "/proc/no/such/folder"
    configure_caches(spec(tmp_path))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(user_tmp() / "torchinductor")


def test_unusable_cache_dir_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"paths.cache_dir: cannot create the cache folder /proc/"):
        configure_caches(spec(tmp_path, Path("/proc/no/such/folder")))
