"""Target-prior estimation (lade_core.label_shift) against independent float64 numpy formulas, and on synthetic
data with a known shift: Gaussian classes whose exact Bayes posteriors are known."""
import numpy as np
import pytest
import torch

from lade_core.label_shift import (
    BCTS_MIN_PER_CLASS,
    auto_calibration,
    bbse_prior,
    calibrate,
    em_prior,
    estimate_target_prior,
    fit_bcts,
    fit_calibration,
    source_logits,
)
from lade_core.priors import long_tailed_counts, prior_from_counts

C, D = 10, 4


def _softmax(a):
    a = a - a.max(1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(1, keepdims=True)


def _em_numpy(post, ps, iters):
    """Saerens et al. (2002), Eq. 2.9-2.10, written out: iterate p_t^(s+1)(y) = 1/N sum_i p^(s)(y|x_i) with
    p^(s)(y|x) = [p_t^(s)(y)/p_s(y)] p_s(y|x) / sum_k [p_t^(s)(k)/p_s(k)] p_s(k|x)."""
    pt = ps.copy()
    for _ in range(iters):
        num = post * (pt / ps)[None, :]
        pt = (num / num.sum(1, keepdims=True)).mean(0)
    return pt


class Gaussians:
    """Classes N(mu_c, I) in d=4: a softmax model with logits log N(x; mu_c, I) + log p_s(c) is Bayes-optimal on
    the source; a LADE / Balanced-Softmax model's logits are the log-likelihoods alone."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.means = 1.5 * torch.randn(C, D, generator=self.g, dtype=torch.float64)
        self.ps = prior_from_counts(long_tailed_counts(C, 500, 20))

    def sample(self, prior, n):
        y = torch.multinomial(prior, n, replacement=True, generator=self.g)
        return self.means[y] + torch.randn(n, D, generator=self.g, dtype=torch.float64), y

    def loglik(self, x):
        return -0.5 * torch.cdist(x, self.means) ** 2


@pytest.fixture
def world():
    return Gaussians()


def test_source_logits_follow_each_loss_rule(world):
    z = torch.randn(5, C, generator=world.g, dtype=torch.float64)
    assert torch.allclose(source_logits(z, world.ps, "softmax"), z)
    for loss in ("lade", "balanced_softmax"):
        assert torch.allclose(source_logits(z, world.ps, loss), z + world.ps.log())


def test_em_equals_the_written_out_fixed_point(world):
    post = torch.softmax(torch.randn(300, C, generator=world.g, dtype=torch.float64), 1)
    est, info = em_prior(post, world.ps, tol=1e-13)
    assert info["converged"]
    ref = _em_numpy(post.numpy(), world.ps.numpy(), info["iterations"])
    np.testing.assert_allclose(est.numpy(), ref, rtol=1e-9, atol=1e-12)
    # A fixed point: one more EM step of the written-out formula leaves it unchanged.
    np.testing.assert_allclose(_em_numpy(post.numpy(), world.ps.numpy(), info["iterations"] + 50), ref, atol=1e-10)


def test_bbse_equals_the_written_out_linear_system(world):
    xv, yv = world.sample(torch.full((C,), 1 / C, dtype=torch.float64), 3000)
    xt, _ = world.sample(world.ps.flip(0), 4000)
    pv, pt = torch.softmax(world.loglik(xv), 1), torch.softmax(world.loglik(xt), 1)
    est, _ = bbse_prior(pt, pv, yv)
    yhat_v, yhat_t = pv.argmax(1).numpy(), pt.argmax(1).numpy()
    conf = np.zeros((C, C))
    for i, j in zip(yhat_v, yv.numpy()):
        conf[i, j] += 1 / len(yv)
    mu = np.bincount(yhat_t, minlength=C) / len(yhat_t)
    w = np.linalg.solve(conf, mu)
    ref = np.clip(w, 0, None) * np.bincount(yv.numpy(), minlength=C) / len(yv)
    np.testing.assert_allclose(est.numpy(), ref / ref.sum(), rtol=1e-8)


def test_bcts_recovers_a_known_temperature_and_bias(world):
    z = 3 * torch.randn(40_000, C, generator=world.g, dtype=torch.float64)
    t0, b0 = 2.5, torch.linspace(-1, 1, C, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / t0 + b0, 1), 1, generator=world.g).squeeze(1)
    t, b = fit_bcts(z, y)
    assert t == pytest.approx(t0, rel=0.05)
    assert torch.allclose(b, b0 - b0.mean(), atol=0.08)
    # Mutation check of the estimator: the NLL at the fit is below the NLL at T=1, b=0.
    nll = lambda p: float(-p[torch.arange(len(y)), y].log().mean())  # noqa: E731
    assert nll(torch.softmax(z / t + b, 1)) < nll(calibrate(z, None)) - 0.05


@pytest.mark.parametrize("loss", ["softmax", "lade"])
@pytest.mark.parametrize("method", ["em", "bbse"])
def test_estimate_converges_to_the_true_prior_as_the_sample_grows(world, loss, method):
    """Exact source posteriors (the Bayes classifier under p_s); the target is the source's class order reversed."""
    p_true = prior_from_counts(list(reversed(long_tailed_counts(C, 500, 20))))
    xv, yv = world.sample(torch.full((C,), 1 / C, dtype=torch.float64), 20_000)
    logits = (lambda x: world.loglik(x) + world.ps.log()) if loss == "softmax" else world.loglik
    errors = []
    for n in (100, 1_000, 100_000):
        x, _ = world.sample(p_true, n)
        est, info = estimate_target_prior(logits(x), world.ps, loss=loss, method=method,
                                          val_logits=logits(xv), val_labels=yv)
        assert est.dtype == torch.float64 and est.sum().item() == pytest.approx(1.0)
        errors.append(0.5 * float((est - p_true).abs().sum()))
    assert errors[-1] < errors[0] and errors[-1] < 0.02, errors
    # The estimate beats not estimating: the source prior is far from the truth.
    assert errors[-1] < 0.1 * 0.5 * float((world.ps - p_true).abs().sum())


def test_calibration_on_a_balanced_validation_split_refers_to_the_source_prior(world):
    """Exact source posteriors need no calibration: fitted on a class-balanced split (p_val != p_s), BCTS finds
    T = 1 and b = 0 because the known offset log p_val - log p_s is held fixed, not learned into b."""
    xv, yv = world.sample(torch.full((C,), 1 / C, dtype=torch.float64), 40_000)
    z = world.loglik(xv) + world.ps.log()  # softmax(z) = p_s(y|x)
    cal = fit_calibration(z, yv, world.ps)
    assert cal.temperature == pytest.approx(1, abs=0.03) and cal.bias.abs().max() < 0.1, cal
    assert auto_calibration(z[: BCTS_MIN_PER_CLASS * C - 1], yv[: BCTS_MIN_PER_CLASS * C - 1], world.ps) is None
    assert auto_calibration(z, yv, world.ps) is not None


def test_bcts_calibrated_em_fixes_an_overconfident_model(world):
    """A model whose logits are 3x too sharp: EM on its raw posteriors is biased, BCTS-calibrated EM is not."""
    p_true = prior_from_counts(list(reversed(long_tailed_counts(C, 500, 20))))
    xv, yv = world.sample(torch.full((C,), 1 / C, dtype=torch.float64), 20_000)
    x, _ = world.sample(p_true, 50_000)
    sharp = lambda x: 3 * world.loglik(x)  # noqa: E731  (a "lade" model: logits are the log-likelihoods)
    err = {}
    for cal in (None, "bcts"):
        est, info = estimate_target_prior(sharp(x), world.ps, loss="lade", calibration=cal,
                                          val_logits=sharp(xv), val_labels=yv)
        err[cal] = 0.5 * float((est - p_true).abs().sum())
    assert info["calibration"]["temperature"] == pytest.approx(3, rel=0.1)
    assert err["bcts"] < 0.03 and err["bcts"] < 0.5 * err[None], err


@pytest.mark.parametrize("kwargs, message", [
    (dict(logits=torch.zeros(5, C)), "at least 10 unlabeled samples"),
    (dict(method="mle"), "unknown prior estimation method"),
    (dict(method="bbse"), "needs validation logits"),
    (dict(calibration="bcts"), "needs validation logits"),
    (dict(calibration="platt"), "unknown calibration"),
    (dict(source_prior=[0.5, 0.5]), "source_prior"),
])
def test_bad_input_is_refused_with_a_named_error(world, kwargs, message):
    args = dict(logits=torch.zeros(50, C), source_prior=world.ps, loss="lade")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        estimate_target_prior(args.pop("logits"), args.pop("source_prior"), **args)
