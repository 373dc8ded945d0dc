import math

import numpy as np
import pytest
import torch

from lade_core.math.metrics import brier, expected_calibration_error, nll, reliability_bins, shot_accuracies


def test_shot_accuracies_on_real_places_lt_counts(places_train_counts, rng):
    counts = np.array(places_train_counts)
    C = len(counts)
    labels = np.repeat(np.arange(C), 10)
    labels = labels[labels != 7]  # a class absent from the evaluated labels must not count in its group
    preds = np.where(rng.random(labels.size) < 0.6, labels, rng.integers(0, C, labels.size))
    out = shot_accuracies(torch.tensor(preds), torch.tensor(labels), counts)

    groups = {"many": [], "medium": [], "few": []}
    for c in range(C):
        idx = [i for i in range(labels.size) if labels[i] == c]
        if not idx:
            continue
        acc = sum(preds[i] == c for i in idx) / len(idx)
        name = "many" if counts[c] > 100 else "few" if counts[c] < 20 else "medium"
        groups[name].append(acc)
    assert out["all"] == pytest.approx(float(np.mean(preds == labels)), abs=1e-12)
    for name, accs in groups.items():
        assert out[name] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    # The real Places-LT split has all three groups populated.
    assert min(len(v) for v in groups.values()) > 10


def test_shot_accuracies_empty_group_is_nan():
    out = shot_accuracies([0, 1], [0, 1], [500, 300])
    assert out["many"] == 1.0 and math.isnan(out["few"]) and math.isnan(out["medium"])


def _ref_ece(probs, labels, n_bins):
    conf = probs.max(1)
    pred = probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(conf)) if lo < conf[i] <= hi]
        if members:
            acc = np.mean([pred[i] == labels[i] for i in members])
            avg = np.mean([conf[i] for i in members])
            total += len(members) / len(conf) * abs(acc - avg)
    return total


def test_ece_matches_reference_with_boundary_confidences(rng):
    probs = rng.dirichlet(np.ones(4) * 0.5, size=300)
    # Confidences exactly on bin edges belong to the lower bin: (lo, hi].
    probs[0] = [0.5, 0.25, 0.25, 0.0]
    probs[1] = [0.25, 0.75, 0.0, 0.0]
    labels = rng.integers(0, 4, 300)
    for n_bins in (1, 4, 20):
        assert expected_calibration_error(torch.tensor(probs), labels, n_bins) == pytest.approx(
            _ref_ece(probs, labels, n_bins), abs=1e-12
        )
    bins = reliability_bins(torch.tensor(probs), labels, 20)
    assert bins["count"].sum() == 300
    assert bins["count"][9] == sum(1 for c in probs.max(1) if 0.45 < c <= 0.5)


def test_nll_and_brier_match_formulas(rng):
    z = rng.normal(size=(50, 6))
    y = rng.integers(0, 6, 50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert nll(torch.tensor(z), y) == pytest.approx(-np.mean(np.log(p[np.arange(50), y])), abs=1e-12)
    onehot = np.eye(6)[y]
    assert brier(torch.tensor(p), y) == pytest.approx(np.mean(((p - onehot) ** 2).sum(1)), abs=1e-12)
