import pytest
import torch

from alignlib.evaluation import bootstrap_mean, paired_difference

pytestmark = pytest.mark.unit


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_items():
    gen = torch.Generator().manual_seed(0)
    small = bootstrap_mean(torch.randn(20, generator=gen) + 1.0)
    large = bootstrap_mean(torch.randn(2000, generator=gen) + 1.0)
    assert small.low < small.mean < small.high and large.low < large.mean < large.high
    assert large.high - large.low < small.high - small.low
    assert large.excludes_zero and 0.9 < large.mean < 1.1


def test_paired_difference_is_the_mean_of_differences():
    after, before = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 2.0])
    assert paired_difference(after, before).mean == pytest.approx(0.5)
    assert bootstrap_mean([0.0, 0.0, 0.0]).excludes_zero is False


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0])
