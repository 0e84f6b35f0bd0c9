import math

import pytest
import torch
from scipy import stats

from dbl.diffusion.partition import make_partition
from dbl.diffusion.sigma import LogNormal

GOLDEN = {  # method spec, section 3
    2: [0.002, 0.3012, 80],
    3: [0.002, 0.1796, 0.5050, 80],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80],
    6: [0.002, 0.0943, 0.1796, 0.3012, 0.5050, 0.9617, 80],
}


@pytest.mark.parametrize("num_blocks", sorted(GOLDEN))
def test_equiprobable_boundaries_match_spec(num_blocks):
    part = make_partition("equiprobable", num_blocks)
    assert [round(b, 4) for b in part.boundaries] == GOLDEN[num_blocks]


@pytest.mark.parametrize("num_blocks", [2, 3, 4, 6])
def test_every_block_carries_equal_mass(num_blocks):
    density = LogNormal()
    part = make_partition("equiprobable", num_blocks)
    total = density.mass(0.002, 80.0)
    masses = [density.mass(*part.nominal_range(b)) / total for b in range(num_blocks)]
    assert masses == pytest.approx([1 / num_blocks] * num_blocks, abs=1e-9)


def test_block_zero_owns_highest_noise():
    part = make_partition("equiprobable", 3)
    assert part.nominal_range(0) == pytest.approx((0.5050, 80.0), abs=1e-4)
    assert part.nominal_range(2) == pytest.approx((0.002, 0.1796), abs=1e-4)
    sig = torch.tensor([79.0, 1.0, 0.3, 0.1, 0.002])
    assert part.block_of(sig).tolist() == [0, 0, 1, 2, 2]
    # a boundary belongs to the lower-noise block
    assert part.block_of(part.boundaries[1]).item() == 2


def test_widened_ranges_match_spec():
    part = make_partition("equiprobable", 3, overlap=0.05)
    expected = {2: (0.002, 0.2249), 1: (0.1706, 0.5318), 0: (0.3920, 80.0)}
    for block, rng in expected.items():
        assert part.widened_range(block) == pytest.approx(rng, abs=1e-4)


def test_uniform_block_then_in_block_sampling_reproduces_global_density():
    """At gamma = 0, pick a block uniformly then sample inside it == the truncated log-normal."""
    density = LogNormal()
    part = make_partition("equiprobable", 4)
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    blocks = torch.randint(0, 4, (n,), generator=gen)
    draws = torch.cat([density.sample(int((blocks == b).sum()), *part.nominal_range(b), generator=gen) for b in range(4)])
    q_lo, q_hi = density.cdf(0.002).item(), density.cdf(80.0).item()

    def truncated_cdf(x):
        return (density.cdf(torch.as_tensor(x)).numpy() - q_lo) / (q_hi - q_lo)

    result = stats.kstest(draws.double().numpy(), truncated_cdf)
    assert result.pvalue > 1e-3, result
    # and a partition with unequal masses fails the same test (so the test can fail)
    bad = make_partition("uniform_log", 4)
    draws_bad = torch.cat([density.sample(n // 4, *bad.nominal_range(b), generator=gen) for b in range(4)])
    assert stats.kstest(draws_bad.double().numpy(), truncated_cdf).pvalue < 1e-6


def test_baseline_partitions():
    log = make_partition("uniform_log", 2)
    assert log.boundaries[1] == pytest.approx(math.sqrt(0.002 * 80))
    lin = make_partition("uniform_linear", 2)
    assert lin.boundaries[1] == pytest.approx((80 + 0.002) / 2)


def test_samples_stay_inside_range():
    lo, hi = 0.1796, 0.5050
    s = LogNormal().sample(10_000, lo, hi, generator=torch.Generator().manual_seed(1))
    assert s.min() >= lo and s.max() <= hi


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="nope", num_blocks=3), "unknown partition 'nope'"),
        (dict(kind="equiprobable", num_blocks=3, overlap=-0.1), "overlap must be >= 0"),
        (dict(kind="equiprobable", num_blocks=0), "num_blocks must be >= 1"),
    ],
)
def test_bad_partition_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_partition(**kwargs)
