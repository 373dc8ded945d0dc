"""lade_core.math.evaluation against direct computations with the lade_core metric functions and plain loops."""
import math

import numpy as np
import pytest
import torch

from lade_core.math.evaluation import (
    calibration_by_rule,
    evaluate_targets,
    logit_statistics,
    mean_predicted_prior,
    protocol_targets,
    target_from_values,
)
from lade_core.math.metrics import expected_calibration_error, nll, reliability_bins, shot_accuracies
from lade_core.math.posthoc import posthoc_logits
from lade_core.math.priors import (
    KNOCKOUT_PROTOCOL,
    SHIFT_PROTOCOL,
    knockout_counts,
    long_tailed_counts,
    prior_from_counts,
    shifted_counts,
)

C, PER_CLASS = 12, 30
TRAIN = long_tailed_counts(C, 300, 30)  # 300 .. 10: Many, Medium and Few classes all present


@pytest.fixture
def data(rng):
    labels = torch.as_tensor(rng.permutation(np.repeat(np.arange(C), PER_CLASS)))
    logits = torch.as_tensor(rng.normal(size=(labels.numel(), C)) * 2)
    logits[torch.arange(labels.numel()), labels] += 2.5
    return logits, labels  # float64 [360, 12], [360]


def _direct(logits, labels, source_prior, target, mode):
    idx = torch.as_tensor(target.indices)
    z, y = posthoc_logits(logits[idx].double(), mode, source_prior, target.prior), labels[idx]
    acc = shot_accuracies(z.argmax(1), y, TRAIN)
    return {"top1": acc["all"], "many": acc["many"], "medium": acc["medium"], "few": acc["few"],
            "nll": nll(z, y), "ece": expected_calibration_error(torch.softmax(z, 1), y)}


@pytest.mark.parametrize("modes", [("inject", "raw"), ("raw", "pc")])
def test_protocol_table_equals_direct_computation(data, modes):
    logits, labels = data
    ps = prior_from_counts(TRAIN)
    targets = protocol_targets(labels, TRAIN, knockouts=True)  # knock-outs: priors with zeros, offsets of -inf
    rows = evaluate_targets(logits, labels, ps, TRAIN, modes, targets)
    assert [(r["target"], r["mode"]) for r in rows] == [(t.name, m) for t in targets for m in modes]
    for row, (t, mode) in zip(rows, [(t, m) for t in targets for m in modes]):
        want = _direct(logits, labels, ps, t, mode)
        assert row["n"] == len(t.indices)
        for k, v in want.items():
            assert row[k] == pytest.approx(v, abs=1e-9, nan_ok=True), (t.name, mode, k)
    # float32 logits (as stored) give the same table up to float32 rounding.
    rows32 = evaluate_targets(logits.float(), labels, ps, TRAIN, modes, targets)
    for a, b in zip(rows, rows32):
        for k in ("top1", "many", "medium", "few"):
            assert a[k] == pytest.approx(b[k], abs=1e-12, nan_ok=True)
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
        assert a["ece"] == pytest.approx(b["ece"], abs=1e-4)


def test_posthoc_matters_under_shift(data):
    # A softmax-trained classifier biased toward head classes: PC beats raw under backward shift.
    logits, labels = data
    ps = prior_from_counts(TRAIN)
    biased = logits + ps.log()
    t = {t.name: t for t in protocol_targets(labels, TRAIN)}
    rows = {r["mode"]: r for r in evaluate_targets(biased, labels, ps, TRAIN, ("raw", "pc"), [t["backward_25"]])}
    assert rows["pc"]["top1"] > rows["raw"]["top1"] + 0.05


def test_protocol_targets_follow_shifted_counts(data):
    _, labels = data
    targets = protocol_targets(labels, TRAIN)
    assert len(targets) == 11
    for t, (direction, ratio) in zip(targets, SHIFT_PROTOCOL):
        want = shifted_counts(TRAIN, PER_CLASS, ratio, direction)
        got = np.bincount(labels[torch.as_tensor(t.indices)].numpy(), minlength=C)
        assert got.tolist() == want
        assert torch.allclose(t.prior, torch.tensor(want, dtype=torch.float64) / sum(want))
    assert targets[5].name == "uniform" and len(targets[5].indices) == C * PER_CLASS


def test_knockout_targets_drop_exactly_the_named_classes(data):
    """Head: the most frequent training classes go, tail: the least (TRAIN is sorted, so the first / last k
    indices), random: the same k classes every time; the rest keep the first PER_CLASS test images each."""
    _, labels = data
    targets = protocol_targets(labels, TRAIN, knockouts=True)
    assert [t.name for t in targets[11:]] == [f"knockout_{k}_{p}" for k, p in KNOCKOUT_PROTOCOL]
    assert protocol_targets(labels, TRAIN)[-1].name == "backward_50"  # the 11 alone by default
    rank = sorted(range(C), key=lambda c: -TRAIN[c])
    for t, (kind, percent) in zip(targets[11:], KNOCKOUT_PROTOCOL):
        k = round(percent / 100 * C)
        got = np.bincount(labels[torch.as_tensor(t.indices)].numpy(), minlength=C)
        gone = set(np.nonzero(got == 0)[0].tolist())
        assert len(gone) == k and set(got[got > 0].tolist()) == {PER_CLASS}, (t.name, got)
        if kind == "head":
            assert gone == set(rank[:k])
        elif kind == "tail":
            assert gone == set(rank[-k:])
        else:
            assert gone == {c for c, n in enumerate(knockout_counts(TRAIN, PER_CLASS, "random", percent)) if n == 0}
            assert gone not in (set(rank[:k]), set(rank[-k:]))
        assert torch.allclose(t.prior, torch.as_tensor(got / got.sum(), dtype=torch.float64))
        # The first PER_CLASS test images of each kept class, in dataset order.
        for c in set(range(C)) - gone:
            first = np.nonzero(labels.numpy() == c)[0][:PER_CLASS]
            assert set(first.tolist()) <= set(t.indices.tolist())
    for kwargs, message in ((dict(kind="middle", percent=25), "knock-out kind must be"),
                            (dict(kind="head", percent=100), "knock-out percent must be in")):
        with pytest.raises(ValueError, match=message):
            knockout_counts(TRAIN, PER_CLASS, **kwargs)


def test_user_target_from_counts_and_probabilities(data):
    _, labels = data
    counts = [3] * 6 + [1] * 6
    t = target_from_values("mine", counts, labels, C)
    y = labels.numpy()
    assert np.bincount(y[t.indices], minlength=C).tolist() == counts
    # The first n_c of each class in dataset order.
    for c in range(C):
        assert t.indices[y[t.indices] == c].tolist() == np.nonzero(y == c)[0][:counts[c]].tolist()
    p = np.array([4.0] * 3 + [1.0] * 9)
    p /= p.sum()
    t = target_from_values("probs", p, labels, C)
    got = np.bincount(y[t.indices], minlength=C)
    assert got.tolist() == [30] * 3 + [7] * 9  # the largest subset in proportion 4:1 (30 = all of a head class)
    assert torch.allclose(t.prior, torch.as_tensor(p))


@pytest.mark.parametrize("values, message", [
    ([0.5, 0.5], "wrong length: 2 entries for 12 classes"),
    ([-1.0] + [1.0] * 11, "negative at class indices [0]"),
    ([float("nan")] + [1.0] * 11, "NaN or infinite"),
    ([31] + [1] * 11, "asks for more test samples than exist: class 0 needs 31"),
    ([0.3] * 12, "does not sum to 1"),
])
def test_user_target_bad_input(data, values, message):
    _, labels = data
    with pytest.raises(ValueError, match=None) as e:
        target_from_values("bad", values, labels, C)
    assert message in str(e.value)


def test_protocol_needs_enough_test_samples(data):
    _, labels = data
    with pytest.raises(ValueError, match="asks for more test samples than exist"):
        protocol_targets(labels, TRAIN, per_class=PER_CLASS + 1)


def test_figure_quantities_match_loops(data):
    logits, labels = data
    stats = logit_statistics(logits, labels)
    for c in range(C):
        pos = logits[labels == c, c]
        neg = logits[labels != c, c]
        assert stats["pos_mean"][c] == pytest.approx(float(pos.mean()), abs=1e-9)
        assert stats["pos_std"][c] == pytest.approx(float(pos.std(unbiased=False)), abs=1e-7)
        assert stats["neg_mean"][c] == pytest.approx(float(neg.mean()), abs=1e-9)
        assert stats["neg_std"][c] == pytest.approx(float(neg.std(unbiased=False)), abs=1e-7)
    ps = prior_from_counts(TRAIN)
    uniform = protocol_targets(labels, TRAIN)[5]
    bins = calibration_by_rule(logits, labels, ps, uniform, ("pc",))["pc"]
    ref = reliability_bins(torch.softmax(posthoc_logits(logits, "pc", ps, uniform.prior), 1), labels)
    for k in ref:
        assert torch.allclose(bins[k], ref[k], atol=1e-12)
    avg = mean_predicted_prior(logits, ps, uniform, "raw")
    assert torch.allclose(avg, torch.softmax(logits, 1).mean(0)) and math.isclose(float(avg.sum()), 1.0)


@pytest.mark.parametrize("case, message", [
    ("negative_class_csv", "negative class indices [-1]"),
    ("prior_not_summing_to_1", "source prior does not sum to 1"),
    ("nan_logits", "logits are NaN or infinite in 1 rows, e.g. [2]"),
    ("label_out_of_range", "labels must lie in [0, 3), got [0, 3]"),
    ("counts_wrong_length", "train_counts has 2 entries for 3 classes"),
])
@pytest.mark.slow  # runs pipelines/evaluate.py, as a user does
def test_evaluate_refuses_bad_logits_priors_and_files(tmp_path, capsys, case, message):
    """pipelines/evaluate.py on local files: every bad input is one `error:` line and exit 2, no table."""
    import json

    from conftest import Script

    evaluate = Script("evaluate")
    from lade_core.tracking.artifacts import write_logits_parquet

    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    info = {"source_prior": [0.5, 0.3, 0.2], "train_counts": [50, 30, 20]}
    target = tmp_path / "target.csv"
    target.write_text("0,0.5\n1,0.25\n2,0.25\n")
    if case == "negative_class_csv":
        target.write_text("0,0.5\n1,0.25\n-1,0.25\n")  # once read as "the last class"
    elif case == "prior_not_summing_to_1":
        info["source_prior"] = [0.5, 0.3, 0.3]
    elif case == "nan_logits":
        logits[2, 1] = float("nan")
    elif case == "label_out_of_range":
        labels[-1] = 3
    elif case == "counts_wrong_length":
        info["train_counts"] = [50, 30]
    write_logits_parquet(tmp_path / "test_logits.parquet", logits, labels)
    (tmp_path / "source_prior.json").write_text(json.dumps(info))
    rc = evaluate.main(["--logits", str(tmp_path / "test_logits.parquet"), "--source-info",
                        str(tmp_path / "source_prior.json"), "--loss", "lade", "--target-prior", str(target),
                        "--per-class", "2", "--output", str(tmp_path / "out"), "--no-figures"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
