
import numpy as np
import pytest
import torch

from lade_core.math.priors import (
    long_tailed_counts,
    prior_from_counts,
    shifted_counts,
    shifted_subset,
    uniform_prior,
    validate_prior,
)


def test_prior_from_counts_matches_normalized_counts():
    counts = [5, 0, 3, 12]
    p = prior_from_counts(counts, smoothing=0.5)
    expected = np.array([5.5, 0.5, 3.5, 12.5]) / 22.0
    assert p.dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(prior_from_counts([1, 3]).numpy(), [0.25, 0.75])


@pytest.mark.parametrize(
    "counts, match",
    [
        ([3, -1, 2, -4], r"negative for class indices \[1, 3\]"),
        ([3, float("nan"), 2], r"NaN or infinite for class indices \[1\]"),
        ([3, 1, float("inf")], r"NaN or infinite for class indices \[2\]"),
        ([0, 0, 0], "sum to zero"),
        ([4, 0, 2, 0], r"zero samples: class indices \[1, 3\]"),
        ([], "empty"),
    ],
)
def test_prior_from_counts_rejects_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        prior_from_counts(counts)


def test_uniform_prior():
    p = uniform_prior(7)
    assert p.shape == (7,) and torch.allclose(p, torch.full((7,), 1 / 7, dtype=torch.float64))
    with pytest.raises(ValueError):
        uniform_prior(0)


@pytest.mark.parametrize(
    "p, match",
    [
        ([0.5, 0.5], "wrong length: 2 entries for 3 classes"),
        ([0.5, -0.1, 0.6], r"negative at class indices \[1\]"),
        ([0.5, float("nan"), 0.5], r"NaN at class indices \[1\]"),
        ([0.5, 0.2, 0.2], "does not sum to 1"),
    ],
)
def test_validate_prior_errors(p, match):
    with pytest.raises(ValueError, match=match):
        validate_prior(p, 3)


def test_validate_prior_accepts_within_tolerance():
    p = validate_prior([0.2, 0.3, 0.5 + 5e-7], 3)
    assert p.dtype == torch.float64


@pytest.mark.parametrize("ratio, total", [(10, 19573), (50, 12608), (100, 10847)])
def test_long_tailed_counts_cifar100_profile(ratio, total):
    # CIFAR-100-LT sizes as published with the LDAM/LADE code for ratios 10/50/100.
    counts = long_tailed_counts(100, 500, ratio)
    assert counts[0] == 500 and counts[-1] == int(500 / ratio)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(counts) == total
    k = 37
    assert counts[k] == int(500 * (1 / ratio) ** (k / 99))


def test_long_tailed_counts_single_class_and_errors():
    assert long_tailed_counts(1, 30, 100) == [30]
    with pytest.raises(ValueError):
        long_tailed_counts(10, 100, 0.5)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_shifted_counts_published_places_lt_totals(places_train_counts, direction):
    assert len(places_train_counts) == 365
    totals = {r: sum(shifted_counts(places_train_counts, 100, r, direction)) for r in (50, 25, 10, 5, 2, 1)}
    assert totals == {50: 8989, 25: 10727, 10: 14103, 5: 17970, 2: 26155, 1: 36500}


def test_shifted_counts_ranks_by_train_count_with_index_ties():
    train = [10, 50, 10, 80]  # ranking: class 3, class 1, class 0 (tie with 2, lower index first), class 2
    fwd = shifted_counts(train, 100, 10, "forward")
    bwd = shifted_counts(train, 100, 10, "backward")
    profile = [int(100 * 0.1 ** (k / 3)) for k in range(4)]  # [100, 46, 21, 10]
    assert fwd == [profile[2], profile[1], profile[3], profile[0]]
    assert bwd == [profile[1], profile[2], profile[0], profile[3]]
    assert shifted_counts(train, 100, 1, "forward") == [100] * 4
    with pytest.raises(ValueError, match="direction"):
        shifted_counts(train, 100, 10, "sideways")


def _naive_subset(labels, wanted):
    taken, keep = [0] * len(wanted), []
    for i, y in enumerate(labels):
        if taken[y] < wanted[y]:
            taken[y] += 1
            keep.append(i)
    return keep


def test_shifted_subset_keeps_first_samples_in_dataset_order(rng):
    C = 6
    labels = rng.permutation(np.repeat(np.arange(C), 20))
    train = [500, 5, 120, 40, 40, 900]
    for direction in ("forward", "backward"):
        for ratio in (1, 2, 10):
            idx = shifted_subset(labels, train, 20, ratio, direction)
            wanted = shifted_counts(train, 20, ratio, direction)
            assert idx.tolist() == _naive_subset(labels.tolist(), wanted)
            assert np.bincount(labels[idx], minlength=C).tolist() == wanted


def test_shifted_subset_errors_when_class_is_short():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ValueError, match="class 1 needs 10 but the test split has 3"):
        shifted_subset(labels, [5, 5], 10, 1, "forward")


def test_tempered_class_weights_interpolate_between_uniform_and_source_prior():
    from lade_core.math.priors import tempered_class_weights

    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert torch.allclose(tempered_class_weights(p, 1), p)
    assert torch.allclose(tempered_class_weights(p, 0), torch.full((3,), 1 / 3, dtype=torch.float64))
    half = tempered_class_weights(p, 0.5)
    assert torch.allclose(half, p.sqrt() / p.sqrt().sum()) and half.sum().item() == pytest.approx(1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="class_weight_power must lie in"):
            tempered_class_weights(p, bad)
