"""The (t, r) sampler: ordering, the r = t block, the clamp, and the distribution of logit(t), logit(r)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from neuromf.meanflow.time_sampler import num_flow_matching, sample_time_pairs
from neuromf.spec.schema import TimeSamplingSpec


def _gen(seed: int = 1234) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("batch", [1, 3, 8, 24, 101])
def test_order_block_and_clamp(batch: int) -> None:
    spec = TimeSamplingSpec(t_min=0.2)  # a high clamp, so it really bites
    t, r = sample_time_pairs(batch, spec, _gen(), "cpu")
    n_fm = math.floor(batch * 0.25)
    assert t.shape == r.shape == (batch,) and t.dtype == r.dtype == torch.float32
    assert bool((t >= r).all())
    assert bool((r >= 0.2).all()) and bool((t <= 1.0).all())
    assert torch.equal(r[:n_fm], t[:n_fm])  # the leading block has r = t ...
    rest = t[n_fm:] > 0.2  # where both times were clamped, r = t = t_min legitimately
    assert bool((r[n_fm:][rest] < t[n_fm:][rest]).all())  # ... and (continuous times) only that block
    if batch >= 24:
        assert bool((r == 0.2).any())  # the clamp is hit with mu = -0.4, sigma = 1, t_min = 0.2


def test_block_size_floor() -> None:
    assert num_flow_matching(8, 0.25) == 2
    assert num_flow_matching(7, 0.25) == 1
    assert num_flow_matching(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in floating point
    assert num_flow_matching(5, 0.0) == 0
    assert num_flow_matching(5, 1.0) == 5


def test_deterministic_given_generator() -> None:
    spec = TimeSamplingSpec()
    a = sample_time_pairs(16, spec, _gen(7), "cpu")
    b = sample_time_pairs(16, spec, _gen(7), "cpu")
    c = sample_time_pairs(16, spec, _gen(8), "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_distribution_matches_max_min_of_two_normals() -> None:
    """logit(t) ~ max of two N(mu, sigma), logit(r) ~ min: KS tests against the exact CDFs.

    With X1, X2 iid N(mu, sigma): P(max <= x) = Phi(z)^2 and P(min <= x) = 1 - (1 - Phi(z))^2.
    t_min is set far below any draw so the clamp does not distort the test; the r = t block is
    switched off (data_proportion = 0) so r is the pure minimum.
    """
    mu, sigma, n = -0.4, 1.0, 20000
    spec = TimeSamplingSpec(mu=mu, sigma=sigma, t_min=1e-6, data_proportion=0.0)
    t, r = sample_time_pairs(n, spec, _gen(2024), "cpu")
    lt = torch.logit(t.double()).numpy()
    lr = torch.logit(r.double()).numpy()
    phi = lambda x: stats.norm.cdf(x, loc=mu, scale=sigma)  # noqa: E731
    p_max = stats.kstest(lt, lambda x: phi(x) ** 2).pvalue
    p_min = stats.kstest(lr, lambda x: 1 - (1 - phi(x)) ** 2).pvalue
    assert p_max > 0.01 and p_min > 0.01, (p_max, p_min)
    # The test has power: a plain (un-maxed) normal is rejected decisively.
    assert stats.kstest(lt, phi).pvalue < 1e-10
    # Means: E[max] = mu + sigma / sqrt(pi), E[min] = mu - sigma / sqrt(pi).
    assert abs(lt.mean() - (mu + sigma / math.sqrt(math.pi))) < 0.02
    assert abs(lr.mean() - (mu - sigma / math.sqrt(math.pi))) < 0.02


def test_device_argument_moves_result() -> None:
    t, r = sample_time_pairs(4, TimeSamplingSpec(), _gen(), torch.device("cpu"))
    assert t.device.type == "cpu" and r.device.type == "cpu"
