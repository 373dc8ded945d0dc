"""Losses against float64 formulas written here from the paper's equations, loop by loop."""
import math

import numpy as np
import pytest
import torch

from lade_core.math.losses import BalancedSoftmaxLoss, LADELoss, LADERLoss, lade_reference

SHAPES = [(1, 1), (1, 5), (6, 1), (16, 10), (48, 37)]


def _lse(v):
    m = np.max(v)
    return m + math.log(np.sum(np.exp(v - m)))


def ref_balanced_ce(z, y, ps):
    n, c = z.shape
    total = 0.0
    for i in range(n):
        row = [z[i, k] + math.log(ps[k]) for k in range(c)]
        total += _lse(np.array(row)) - row[y[i]]
    return total / n


def ref_lader(z, y, ps, lam, alpha_c, estimator):
    n, c = z.shape
    loss = 0.0
    for k in range(c):
        members = [i for i in range(n) if y[i] == k]
        if estimator == "paper" and not members:
            continue  # Eq. 16 sums over classes present in the batch
        first = sum(z[i, k] for i in members) / len(members) if members else 0.0
        if estimator == "released":
            # log((1/N) sum_i e^{z_ik} * (1/C) / p_s(k))
            second = _lse(np.array([z[i, k] + math.log(1.0 / c) - math.log(ps[k]) for i in range(n)])) - math.log(n)
        else:
            # log((1/N) sum_i [(1/C) / p_s(y_i)] e^{z_ik})
            second = _lse(np.array([z[i, k] + math.log(1.0 / c) - math.log(ps[y[i]]) for i in range(n)])) - math.log(n)
        loss -= alpha_c[k] * (first - second - lam * second**2)
    return loss


def _batch(rng, n, c, scale=2.0):
    z = rng.normal(scale=scale, size=(n, c))
    # Draw targets from a subset so some classes are absent from the batch.
    present = rng.choice(c, size=max(1, (c + 1) // 2), replace=False)
    y = rng.choice(present, size=n)
    ps = rng.dirichlet(np.ones(c)) * 0.9 + 0.1 / c
    return z, y, ps / ps.sum()


@pytest.mark.parametrize("n, c", SHAPES)
def test_balanced_softmax_matches_reference(rng, n, c):
    z, y, ps = _batch(rng, n, c)
    out = BalancedSoftmaxLoss(ps)(torch.tensor(z), torch.tensor(y))
    assert out.item() == pytest.approx(ref_balanced_ce(z, y, ps), abs=1e-10)


@pytest.mark.parametrize("estimator", ["released", "paper"])
@pytest.mark.parametrize("n, c", SHAPES)
def test_lader_matches_reference(rng, n, c, estimator):
    z, y, ps = _batch(rng, n, c)
    lam = 0.3
    for weights in (None, rng.uniform(0, 2, size=c)):
        mod = LADERLoss(ps, lam=lam, class_weights=weights, estimator=estimator)
        alpha_c = ps if weights is None else weights
        out = mod(torch.tensor(z), torch.tensor(y))
        assert out.item() == pytest.approx(ref_lader(z, y, ps, lam, alpha_c, estimator), abs=1e-10)


@pytest.mark.parametrize("estimator", ["released", "paper"])
@pytest.mark.parametrize("n, c", SHAPES)
def test_lade_is_ce_plus_alpha_lader(rng, n, c, estimator):
    z, y, ps = _batch(rng, n, c)
    mod = LADELoss(ps, alpha=0.7, lam=0.2, estimator=estimator)
    out = mod(torch.tensor(z), torch.tensor(y))
    ce, reg = ref_balanced_ce(z, y, ps), ref_lader(z, y, ps, 0.2, ps, estimator)
    assert out.item() == pytest.approx(ce + 0.7 * reg, abs=1e-10)
    assert mod.last_terms["lade_ce"].item() == pytest.approx(ce, abs=1e-10)
    assert mod.last_terms["lader"].item() == pytest.approx(reg, abs=1e-10)


def masked_lader_torch(z, y, ps, lam, alpha_c, estimator):
    """A straightforward C x N masked formulation (independent code path) for gradient comparison."""
    n, c = z.shape
    mask = (y[None, :] == torch.arange(c)[:, None]).double()  # [C, N]
    cnt = mask.sum(1)
    first = (z.T * mask).sum(1) / (cnt + 1e-300)
    if estimator == "released":
        second = torch.logsumexp(z.T + math.log(1 / c) - torch.log(ps)[:, None], dim=1) - math.log(n)
        keep = torch.ones(c, dtype=torch.float64)
    else:
        second = torch.logsumexp(z.T + math.log(1 / c) - torch.log(ps)[y][None, :], dim=1) - math.log(n)
        keep = (cnt > 0).double()
    return -(keep * alpha_c * (first - second - lam * second**2)).sum()


@pytest.mark.parametrize("estimator", ["released", "paper"])
@pytest.mark.parametrize("n, c", SHAPES)
def test_lader_gradient(rng, n, c, estimator):
    z, y, ps = _batch(rng, n, c)
    weights = rng.uniform(0, 1, size=c)
    mod = LADELoss(ps, alpha=0.5, lam=0.25, class_weights=weights, estimator=estimator)
    zt = torch.tensor(z, requires_grad=True)
    yt = torch.tensor(y)
    assert torch.autograd.gradcheck(lambda t: mod(t, yt), (zt,), eps=1e-6, atol=1e-7)
    # And against autograd through the independent masked formulation.
    (g,) = torch.autograd.grad(mod.lader(zt, yt), zt)
    z2 = torch.tensor(z, requires_grad=True)
    ref = masked_lader_torch(z2, yt, torch.tensor(ps), 0.25, torch.tensor(weights), estimator)
    (g_ref,) = torch.autograd.grad(ref, z2)
    assert torch.allclose(g, g_ref, atol=1e-12)


@pytest.mark.parametrize("estimator", ["released", "paper"])
@pytest.mark.parametrize("n, c", SHAPES)
def test_fused_lade_equals_its_readable_reference(rng, n, c, estimator):
    """The fused forward/backward (_LADEFunction) and the equations as written (lade_reference, autograd), in
    float64 and in float32 (where the fused path keeps its own softmaxes)."""
    z, y, ps = _batch(rng, n, c)
    weights, yt = rng.uniform(0, 1, size=c), torch.tensor(y)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        mod = LADELoss(ps, alpha=0.5, lam=0.25, class_weights=weights, estimator=estimator)
        z1, z2 = (torch.tensor(z, dtype=dtype, requires_grad=True) for _ in range(2))
        fused = mod(z1, yt)
        ref = lade_reference(z2, yt, torch.tensor(np.log(ps), dtype=dtype), mod.lader._offset(yt, z2),
                             torch.tensor(weights, dtype=dtype), 0.25, 0.5, present_only=estimator == "paper")
        assert math.isclose(float(fused), float(ref), rel_tol=tol, abs_tol=tol)
        (g1,), (g2,) = torch.autograd.grad(fused, z1), torch.autograd.grad(ref, z2)
        assert torch.allclose(g1, g2, atol=tol / 10)


@pytest.mark.parametrize("estimator", ["released", "paper"])
def test_fused_lade_keeps_a_column_far_below_the_rest(rng, estimator):
    """A class whose logits all lie ~100 nats below the others: its column sum would underflow in the one-exp-pass
    formulation, so the loss takes its exact path there and still equals the equations (float32 and float64)."""
    z, y, ps = _batch(rng, 64, 12)
    z[:, 3] -= 100.0
    yt = torch.tensor(y)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        mod = LADELoss(ps, alpha=0.5, lam=0.25, estimator=estimator)
        z1, z2 = (torch.tensor(z, dtype=dtype, requires_grad=True) for _ in range(2))
        fused = mod(z1, yt)
        ref = lade_reference(z2, yt, torch.tensor(np.log(ps), dtype=dtype), mod.lader._offset(yt, z2),
                             torch.tensor(ps, dtype=dtype), 0.25, 0.5, present_only=estimator == "paper")
        assert torch.isfinite(fused) and math.isclose(float(fused), float(ref), rel_tol=tol)
        (g1,), (g2,) = torch.autograd.grad(fused, z1), torch.autograd.grad(ref, z2)
        assert torch.allclose(g1, g2, atol=tol / 10)


def test_alpha_zero_lade_equals_balanced_softmax(rng):
    z, y, ps = _batch(rng, 20, 8)
    zt = torch.tensor(z, requires_grad=True)
    lade = LADELoss(ps, alpha=0.0, lam=0.5)(zt, torch.tensor(y))
    (g1,) = torch.autograd.grad(lade, zt)
    bal = BalancedSoftmaxLoss(ps)(zt, torch.tensor(y))
    (g2,) = torch.autograd.grad(bal, zt)
    assert lade.item() == pytest.approx(bal.item(), abs=1e-12)
    assert torch.allclose(g1, g2, atol=1e-14)


def test_stable_under_huge_logits(rng):
    z, y, ps = _batch(rng, 32, 10, scale=1e4)
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    for est in ("released", "paper"):
        loss = LADELoss(ps, alpha=0.1, lam=0.1, estimator=est)(zt, torch.tensor(y))
        (g,) = torch.autograd.grad(loss, zt)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    # A target probability below float32's range (CE ~ 500): its CE is still the exact log-sum-exp, not inf.
    z32 = torch.tensor([[200.0, 0.0, -300.0], [0.0, 1.0, 2.0]])
    y32, ps3 = torch.tensor([2, 0]), [0.5, 0.3, 0.2]
    mod = LADELoss(ps3, alpha=0.1, lam=0.1)
    mod(z32, y32)
    expected = np.mean([ref_balanced_ce(z32.double().numpy()[i:i + 1], [int(y32[i])], ps3) for i in range(2)])
    assert math.isclose(float(mod.last_terms["lade_ce"]), expected, rel_tol=1e-6)


def test_half_precision_logits_computed_in_float32(rng):
    z, y, ps = _batch(rng, 16, 6)
    zt = torch.tensor(z, dtype=torch.bfloat16, requires_grad=True)
    loss = LADELoss(ps)(zt, torch.tensor(y))
    loss.backward()
    assert loss.dtype == torch.float32 and zt.grad.dtype == torch.bfloat16


def test_priors_are_buffers_that_move_with_the_module():
    mod = LADELoss([0.5, 0.3, 0.2])
    names = {n for n, _ in mod.named_buffers()}
    assert {"lade_ce.log_source_prior", "lader.log_source_prior", "lader.class_weights"} <= names
    assert list(mod.parameters()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-0.1), "alpha"),
        (dict(lam=-1.0), "lam"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(class_weights=[0.5, 0.5]), "class_weights has wrong length"),
        (dict(class_weights=[0.5, -0.5, 1.0]), r"class_weights are negative at class indices \[1\]"),
        (dict(class_weights=[0.5, float("nan"), 1.0]), "class_weights are NaN"),
        (dict(estimator="magic"), "unknown estimator"),
    ],
)
def test_lade_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LADELoss([0.5, 0.3, 0.2], **kwargs)


@pytest.mark.parametrize(
    "prior, match",
    [
        ([0.5, 0.6, -0.1], "source_prior is negative"),
        ([0.5, 0.4, 0.2], "does not sum to 1"),
        ([0.5, float("nan"), 0.5], "source_prior is NaN"),
        ([0.5, 0.5, 0.0], r"source_prior is zero at class indices \[2\]"),
    ],
)
def test_losses_reject_bad_source_prior(prior, match):
    for cls in (BalancedSoftmaxLoss, LADERLoss, LADELoss):
        with pytest.raises(ValueError, match=match):
            cls(prior)


def test_losses_reject_bad_targets_and_shapes():
    mod = LADELoss([0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"targets out of range: labels must lie in \[0, 3\)"):
        mod(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"logits must have shape \[N, 3\]"):
        mod(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rows but targets"):
        mod(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# ---------- the registry and each loss's own named terms ----------

def ref_softmax_ce(z, y):
    return sum(_lse(z[i]) - z[i, y[i]] for i in range(len(y))) / len(y)


def test_registry_builds_every_loss_with_its_own_terms(rng):
    from lade_core.methods import LOSSES, build_loss, posthoc_rules

    z, y, ps = _batch(rng, 24, 7)
    zt, yt = torch.tensor(z), torch.tensor(y)
    assert {"softmax", "balanced_softmax", "lade"} <= set(LOSSES)  # the peers: tests/test_peers.py
    soft = build_loss("softmax", ps)
    assert soft(zt, yt).item() == pytest.approx(ref_softmax_ce(z, y), abs=1e-10)
    assert set(soft.last_terms) == {"ce"}
    assert soft.last_terms["ce"].item() == pytest.approx(ref_softmax_ce(z, y), abs=1e-10)
    bal = build_loss("balanced_softmax", ps)
    assert bal(zt, yt).item() == pytest.approx(ref_balanced_ce(z, y, ps), abs=1e-10)
    assert set(bal.last_terms) == {"lade_ce"}  # its whole loss is LADE-CE; no LADER term to report
    lade = build_loss("lade", ps, alpha=0.3, lam=0.2, class_weights=None, estimator="released")
    lade(zt, yt)
    reg = ref_lader(z, y, ps, 0.2, ps, "released")
    assert set(lade.last_terms) == {"lade_ce", "lader", "lader_F", "lader_S"}
    assert lade.last_terms["lader"].item() == pytest.approx(reg, abs=1e-10)
    # F and S as in Eq. 15-16: alpha_c-weighted sums of the per-class mean logit and log importance-weighted mean.
    n, c = z.shape
    f_ref = sum(ps[k] * np.mean([z[i, k] for i in range(n) if y[i] == k]) for k in range(c) if (y == k).any())
    s_ref = sum(ps[k] * (_lse(z[:, k] + math.log(1 / c) - math.log(ps[k])) - math.log(n)) for k in range(c))
    assert lade.last_terms["lader_F"].item() == pytest.approx(f_ref, abs=1e-10)
    assert lade.last_terms["lader_S"].item() == pytest.approx(s_ref, abs=1e-10)
    s_sq = sum(ps[k] * (_lse(z[:, k] + math.log(1 / c) - math.log(ps[k])) - math.log(n)) ** 2 for k in range(c))
    assert reg == pytest.approx(-(f_ref - s_ref - 0.2 * s_sq), abs=1e-10)
    assert [posthoc_rules(k)[0] for k in ("softmax", "balanced_softmax", "lade")] == ["pc", "inject", "inject"]


def test_registry_refuses_unknown_losses_and_hyperparameters():
    from lade_core.methods import build_loss

    with pytest.raises(ValueError,
                       match=r"unknown loss 'fancy'; choose one of \['balanced_softmax', 'balpoe', 'causal_norm', "):
        build_loss("fancy", [0.5, 0.5])
    with pytest.raises(ValueError,
                       match=r"loss 'balanced_softmax' takes no hyperparameters \['alpha'\]; it takes \[\]"):
        build_loss("balanced_softmax", [0.5, 0.5], alpha=0.1)
