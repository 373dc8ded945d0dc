"""Target-prior estimation (lade_core.math.label_shift) against independent float64 numpy formulas, and on synthetic
data with a known shift: Gaussian classes whose exact Bayes posteriors are known."""
import numpy as np
import pytest
import torch

from lade_core.math.label_shift import (
    BCTS_MIN_PER_CLASS,
    auto_calibration,
    bbse_prior,
    calibrate,
    dirichlet_prior,
    em_prior,
    estimate_target_prior,
    expected_gain,
    fit_bcts,
    fit_calibration,
    mapls_lambda,
    mapls_prior,
    select_method,
    source_logits,
)
from lade_core.math.priors import knockout_counts, long_tailed_counts, prior_from_counts

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
@pytest.mark.parametrize("method", ["em", "bbse", "dirichlet", "auto"])
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
    (dict(interval=1.5), "interval must be a level in \\(0, 1\\)"),
    (dict(interval=0.0), "interval must be a level"),
    (dict(interval="90%"), "interval must be a level"),
    (dict(interval=0.9, n_boot=3), "n_boot must be an integer >= 10"),
])
def test_bad_input_is_refused_with_a_named_error(world, kwargs, message):
    args = dict(logits=torch.zeros(50, C), source_prior=world.ps, loss="lade")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        estimate_target_prior(args.pop("logits"), args.pop("source_prior"), **args)


def _kl_numpy(p, q):
    q = q + 1e-8
    return float(np.sum(np.where(p != 0, p * np.log(np.where(p > 0, p, 1) / q), 0)))


def _mapls_numpy(probs, pz, max_iter=100):
    """MAPLS written out from the official code (ChangkunYe/MAPLS, label_shift/mapls.py: ``get_lamda`` and
    ``mapls_EM`` with q_prior uniform, init 'identical', qy_mode 'soft'), in float64 numpy."""
    k = len(pz)
    u = np.ones(k) / k

    def em(lam, q_prior):
        qz = pz.copy()
        w = qz / pz
        for _ in range(max_iter):
            m = probs * w
            m = m / m.sum(-1, keepdims=True)
            qz = lam * m.mean(0) + (1 - lam) * q_prior
            qz /= qz.sum()
            w = qz / pz
        return qz

    lam_inv = lambda dpq, lam: (1 / (1 - lam) - 1) / dpq  # noqa: E731
    lam_forward = lambda dpq, gamma: gamma * dpq / (1 + gamma * dpq)  # noqa: E731
    mlls = em(1, 0)
    su = 1 - lam_forward(_kl_numpy(pz, u), lam_inv(0.5, 0.2))
    tu = lam_forward(_kl_numpy(mlls, u), lam_inv(0.5, su))
    ts = lam_forward(_kl_numpy(mlls, pz), lam_inv(0.5, su))
    lam = 0.9 * tu + 0.1 * (1 - ts)
    return em(lam, u), lam


def test_mapls_equals_the_official_code_written_out(world):
    for target in (world.ps.flip(0), torch.full((C,), 1 / C, dtype=torch.float64), world.ps):
        x, _ = world.sample(target, 400)
        post = torch.softmax(world.loglik(x) + world.ps.log(), 1)
        ref, ref_lam = _mapls_numpy(post.numpy(), world.ps.numpy())
        assert mapls_lambda(post, world.ps) == pytest.approx(ref_lam, rel=1e-10)
        est, info = mapls_prior(post, world.ps)
        assert info["lambda"] == pytest.approx(ref_lam, rel=1e-10) and 0 < info["lambda"] < 1
        np.testing.assert_allclose(est.numpy(), ref, rtol=1e-9, atol=1e-12)
    # lam = 1 is plain EM after the same number of steps; lam = 0 is the uniform prior.
    np.testing.assert_allclose(mapls_prior(post, world.ps, lam=1.0)[0], em_prior(post, world.ps, tol=0.0,
                                                                                   max_iter=100)[0], atol=1e-12)
    assert torch.allclose(mapls_prior(post, world.ps, lam=0.0)[0], torch.full((C,), 1 / C, dtype=torch.float64))
    with pytest.raises(ValueError, match="lambda must be in"):
        mapls_prior(post, world.ps, lam=1.5)


@pytest.mark.slow  # EM to convergence on 2 000 x 1 000 posteriors: about 30 s
def test_mapls_is_closer_than_em_with_many_classes_and_few_images():
    """C = 1000 classes, 2000 target images (2 per class on average), exact posteriors of a moderately accurate
    model, a long-tailed source and a target drawn from a Dirichlet around uniform: MAPLS's total variation to the
    true prior is below EM's."""
    g = torch.Generator().manual_seed(3)
    c, n, snr = 1000, 2000, 4.0
    ps = prior_from_counts(long_tailed_counts(c, 500, 5))
    p_true = torch.distributions.Dirichlet(torch.full((c,), 5.0, dtype=torch.float64)).sample()
    y = torch.multinomial(p_true, n, replacement=True, generator=g)
    s = snr * torch.nn.functional.one_hot(y, c).double() + torch.randn(n, c, generator=g, dtype=torch.float64)
    post = torch.softmax(ps.log() + snr * s, 1)  # p_s(y|s) ∝ p_s(y) exp(snr * s_y): the exact posterior
    tv = {}
    for method, (est, _) in (("em", em_prior(post, ps)), ("mapls", mapls_prior(post, ps))):
        tv[method] = 0.5 * float((est - p_true).abs().sum())
    assert tv["mapls"] < tv["em"], tv


def test_mapls_stays_shrunk_toward_uniform_with_many_images(world):
    """Its lambda depends on divergences, not on the number of images: with 100 000 exact posteriors EM is the
    closer estimate (MAPLS trades that consistency for its smaller variance on few images, the test above)."""
    p_true = world.ps.flip(0)
    x, _ = world.sample(p_true, 100_000)
    logits = world.loglik(x)
    tv = {m: 0.5 * float((estimate_target_prior(logits, world.ps, loss="lade", method=m)[0] - p_true).abs().sum())
          for m in ("em", "mapls")}
    assert tv["em"] < 0.02 < tv["mapls"], tv


def _one_hot_world(g, c, n, snr, prior):
    """A target of ``n`` images: a signal ``snr`` on the true class's coordinate in N(0, I) noise; a LADE model's
    exact logits are the log-likelihood ratios snr * s (p_s(y|x) = softmax(logits + log p_s)). -> (logits, labels)."""
    y = torch.multinomial(prior, n, replacement=True, generator=g)
    s = snr * torch.nn.functional.one_hot(y, c).double() + torch.randn(n, c, generator=g, dtype=torch.float64)
    return snr * s, y


@pytest.mark.parametrize("method", ["em", "mapls", "dirichlet"])
def test_classes_absent_from_the_target_are_estimated_near_zero(method):
    """Half the classes have no target image; then the same logits x 200, so confident that softmax entries are
    exactly 0 in float64 and re-weighted rows can underflow."""
    g = torch.Generator().manual_seed(1)
    ps = prior_from_counts(long_tailed_counts(C, 500, 20))
    present = torch.tensor([1.0 if k % 2 else 0.0 for k in range(C)], dtype=torch.float64)
    logits, _ = _one_hot_world(g, C, 3000, 3.0, present / present.sum())
    # MAPLS keeps a (1 - lambda) / C share on every class; x 200 is an overconfident model, whose few errors are
    # hard labels of absent classes.
    for scale, limit in ((1.0, 0.01 if method == "em" else 0.03), (200.0, 0.05)):
        est, _ = estimate_target_prior(scale * logits, ps, loss="lade", method=method)
        assert torch.isfinite(est).all() and est.sum().item() == pytest.approx(1.0)
        assert float(est[present == 0].max()) < limit, (scale, est)


@pytest.mark.slow  # 20 x 100 bootstrap re-estimations: about 10 s
def test_bootstrap_intervals_cover_the_true_prior():
    """Exact posteriors (one-hot signal in Gaussian noise), 20 repetitions of a 1 500-image target: the 90 %
    intervals cover each class's true p_t in at least 85 % of (repetition, class) cases, and the expected accuracy
    gain over uniform is on average the gain measured with the labels, within its interval in most repetitions."""
    g = torch.Generator().manual_seed(0)
    c, n, snr = 8, 1500, 2.0
    ps = prior_from_counts(long_tailed_counts(c, 500, 10))
    p_true = ps.flip(0)
    covered, gain_ok, gains = [], [], []
    for rep in range(20):
        logits, y = _one_hot_world(g, c, n, snr, p_true)
        est, info = estimate_target_prior(logits, ps, loss="lade", method="em", interval=0.9, n_boot=100, seed=rep)
        iv = info["interval"]
        assert iv["level"] == 0.9 and iv["n_boot"] == 100
        lo, hi = torch.tensor(iv["lower"]), torch.tensor(iv["upper"])
        assert bool(((lo <= est + 1e-12) & (est <= hi + 1e-12)).all())
        covered += ((lo <= p_true) & (p_true <= hi)).tolist()
        # The gain measured with the labels: predictions under the estimate vs under uniform.
        acc = lambda prior: float(((logits + prior.log()).argmax(1) == y).double().mean())  # noqa: E731
        measured = acc(est) - acc(torch.full((c,), 1 / c, dtype=torch.float64))
        gain = iv["gain"]
        assert gain["lower"] <= gain["estimate"] <= gain["upper"]
        gain_ok.append(gain["lower"] - 0.01 <= measured <= gain["upper"] + 0.01)
        gains.append((gain["estimate"], measured))
    assert np.mean(covered) >= 0.85, np.mean(covered)
    # The measured gain has its own label noise (about 0.01 at 1 500 images), which the interval does not hold.
    assert np.mean(gain_ok) >= 0.7, np.mean(gain_ok)
    assert abs(np.mean([e for e, _ in gains]) - np.mean([m for _, m in gains])) < 0.01, gains


def test_expected_gain_is_the_label_free_accuracy_difference(world):
    """Exact posteriors under a reversed target: the label-free gain of injecting the true prior over uniform is
    close to the gain measured with the labels, and 0 for the uniform prior itself."""
    p_true = world.ps.flip(0)
    x, y = world.sample(p_true, 50_000)
    post = torch.softmax(world.loglik(x) + world.ps.log(), 1)
    z = world.loglik(x)
    measured = float(((z + p_true.log()).argmax(1) == y).double().mean() - (z.argmax(1) == y).double().mean())
    assert measured > 0.02
    assert expected_gain(post, world.ps, p_true) == pytest.approx(measured, abs=0.01)
    assert expected_gain(post, world.ps, torch.full((C,), 1 / C, dtype=torch.float64)) == pytest.approx(0, abs=1e-12)


def test_the_dirichlet_map_is_the_stationary_point_of_its_posterior(world):
    """Independently of the fixed-point update: at the estimate, the gradient of the log posterior
    sum_i log sum_y P_iy p_y / ps_y + sum_y (kappa / C) log p_y (a Dirichlet with alpha_y = 1 + kappa / C) is the
    same in every class (the Lagrange condition on the simplex), in float64. kappa = 0 is EM; kappa -> inf uniform."""
    x, _ = world.sample(world.ps.flip(0), 400)
    post = torch.softmax(world.loglik(x) + world.ps.log(), 1).numpy()
    ps = world.ps.numpy()
    for kappa in (None, 3.0, 50.0):
        est, info = dirichlet_prior(torch.from_numpy(post), world.ps, pseudo_counts=kappa, tol=1e-13)
        k = C if kappa is None else kappa
        p = est.numpy()
        grad = (post / ps / (post @ (p / ps))[:, None]).sum(0) + (k / C) / p
        assert info["converged"] and info["pseudo_counts"] == k
        np.testing.assert_allclose(grad, np.full(C, grad.mean()), rtol=1e-8)
        np.testing.assert_allclose(grad.mean(), len(post) + k, rtol=1e-8)  # mu = N + kappa, summing p_y * grad_y
    np.testing.assert_allclose(dirichlet_prior(torch.from_numpy(post), world.ps, 0.0, tol=1e-12)[0],
                               em_prior(torch.from_numpy(post), world.ps, tol=1e-12)[0], atol=1e-9)
    assert torch.allclose(dirichlet_prior(torch.from_numpy(post), world.ps, 1e12)[0],
                          torch.full((C,), 1 / C, dtype=torch.float64), atol=1e-8)
    with pytest.raises(ValueError, match="pseudo_counts must be >= 0"):
        dirichlet_prior(torch.from_numpy(post), world.ps, -1.0)


def _knockout_logits(g, counts, kind, per_class, snr=3.0):
    """A 50 % knock-out target (``knockout_counts``) of a LADE model's exact logits: (logits, true prior)."""
    kc = torch.tensor(knockout_counts(counts, per_class, kind, 50), dtype=torch.float64)
    y = torch.repeat_interleave(torch.arange(len(counts)), kc.long())
    s = snr * torch.nn.functional.one_hot(y, len(counts)).double() + torch.randn(len(y), len(counts), generator=g,
                                                                                  dtype=torch.float64)
    return snr * s, kc / kc.sum()


@pytest.mark.slow  # 2 x 4 estimates with 5-fold selection, 100 classes, up to 16 000 images: about 15 s a kind
@pytest.mark.parametrize("kind", ["head", "tail", "random"])
def test_on_knockout_targets_the_dirichlet_map_leaves_the_absent_classes_what_mapls_keeps(kind):
    """100 classes (CIFAR-100-LT's prior), 4 000 target images, half the classes absent: MAPLS keeps ~0.2 of its
    estimate on them (its lambda does not grow with the images), EM ~0.01; the Dirichlet MAP (kappa = C) ~0.04,
    and less again with 4x the images (it converges to EM). ``auto`` picks the estimator closest to the truth."""
    g = torch.Generator().manual_seed(0)
    counts = long_tailed_counts(100, 500, 100)
    ps = prior_from_counts(counts)
    absent, tv = {}, {}
    for per_class in (80, 320):  # 4 000 and 16 000 images
        logits, p_true = _knockout_logits(g, counts, kind, per_class)
        for m in ("em", "mapls", "dirichlet", "auto"):
            est, info = estimate_target_prior(logits, ps, loss="lade", method=m)
            absent[m, per_class] = float(est[p_true == 0].sum())
            tv[m, per_class] = 0.5 * float((est - p_true).abs().sum())
            if m == "auto":
                chosen = info["method"]
                assert info["chosen_by"]["scores"][chosen] == max(info["chosen_by"]["scores"].values())
        assert tv["auto", per_class] == pytest.approx(min(tv[m, per_class] for m in ("em", "mapls", "dirichlet")))
    assert absent["em", 80] < 0.02 and absent["mapls", 80] > 0.15 and absent["dirichlet", 80] < 0.05, absent
    assert absent["dirichlet", 320] < absent["dirichlet", 80] / 2 and absent["mapls", 320] > 0.15, absent


def test_auto_does_not_take_em_where_it_overfits_few_images():
    """1 000 classes, 1 000 images (one per class): in-sample EM maximizes the likelihood by construction, yet on
    held-out folds it does worst, and ``select_method`` takes a shrunk estimator, the closer one here."""
    g = torch.Generator().manual_seed(3)
    c = 1000
    ps = prior_from_counts(long_tailed_counts(c, 500, 5))
    p_true = torch.distributions.Dirichlet(torch.full((c,), 5.0, dtype=torch.float64)).sample()
    logits, _ = _one_hot_world(g, c, 1000, 3.0, p_true)
    post = torch.softmax(logits + ps.log(), 1)
    chosen, scores = select_method(post, ps)
    assert chosen != "em" and scores["em"] < min(scores["mapls"], scores["dirichlet"]), scores
    tv = {m: 0.5 * float((estimate_target_prior(logits, ps, loss="lade", method=m)[0] - p_true).abs().sum())
          for m in ("em", chosen)}
    assert tv[chosen] < tv["em"], tv
    with pytest.raises(ValueError, match="select_method chooses among"):
        select_method(post, ps, methods=("bbse",))

