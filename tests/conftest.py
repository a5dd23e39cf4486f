"""Shared test settings: small thread counts (CI has 2 cores), deterministic seeds, a tiny model spec."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
