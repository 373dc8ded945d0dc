"""The peers of the paper's comparison against float64 formulas written here from their papers, values and gradients:
logit adjustment (Menon et al. 2021), Focal loss (Lin et al. 2017), LDAM-DRW (Cao et al. 2019), Causal Norm
(Tang et al. 2020) and the τ-normalized classifier (Kang et al. 2020)."""
import math

import numpy as np
import pytest
import torch

from lade_core.math.heads import AdjustedLinear, CausalNormClassifier, CosineClassifier, check_head_state, tau_normalize
from lade_core.methods import LOSSES, build_loss, classifier_head, posthoc_rules
from lade_core.models.backbones import build_model


def _lse(v):
    m = np.max(v)
    return m + math.log(np.sum(np.exp(v - m)))


def _softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def _batch(rng, n=12, c=5, scale=2.0):
    z = rng.normal(scale=scale, size=(n, c))
    y = rng.integers(0, c, size=n)
    counts = np.sort(rng.integers(3, 400, size=c))[::-1].astype(np.int64)
    return z, y, counts, counts / counts.sum()


def _value_and_grad(module, z, y):
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    out = module(zt, torch.tensor(y))
    out.backward()
    return out.item(), zt.grad.numpy()


# ---------- logit adjustment ----------

@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_loss_value_and_gradient(rng, tau):
    z, y, _, ps = _batch(rng)
    n, c = z.shape
    value, grad = _value_and_grad(build_loss("logit_adjusted", ps, tau=tau), z, y)
    # Menon et al. Eq. 10: l(y, z) = -log( e^{z_y + tau log p_y} / sum_k e^{z_k + tau log p_k} ), mean over the batch.
    ref = sum(_lse(z[i] + tau * np.log(ps)) - z[i, y[i]] - tau * math.log(ps[y[i]]) for i in range(n)) / n
    ref_grad = np.stack([(_softmax(z[i] + tau * np.log(ps)) - np.eye(c)[y[i]]) / n for i in range(n)])
    assert value == pytest.approx(ref, abs=1e-10)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-12)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
def test_logit_adjusted_inference_logits_are_disentangled_from_the_source_prior(rng, tau):
    """The head's inference output z + (tau - 1) log p_s with p_t injected at p_t = p_s is the trained posterior
    softmax(z + tau log p_s), and at p_t = p_u it is Menon's post-hoc-free balanced prediction z + (tau-1) log p_s."""
    z, _, _, ps = _batch(rng, n=6, c=4)
    kind, kwargs = classifier_head("logit_adjusted", ps, tau=tau)
    head = AdjustedLinear(3, 4, **kwargs)
    x = torch.randn(6, 3, dtype=torch.float32)
    head.train()
    train_logits = head(x).double().detach()
    head.eval()
    eval_logits = head(x).double().detach()
    np.testing.assert_allclose(eval_logits.numpy(), train_logits.numpy() + (tau - 1) * np.log(ps), rtol=1e-5, atol=1e-5)
    injected = torch.softmax(eval_logits + torch.tensor(np.log(ps)), 1)  # the "inject" rule at p_t = p_s
    np.testing.assert_allclose(injected, torch.softmax(train_logits + tau * torch.tensor(np.log(ps)), 1), atol=1e-5)
    assert kind == "adjusted_linear" and posthoc_rules("logit_adjusted")[0] == "inject"


# ---------- focal loss ----------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_loss_value_and_gradient(rng, gamma):
    z, y, _, ps = _batch(rng)
    n, c = z.shape
    value, grad = _value_and_grad(build_loss("focal", ps, gamma=gamma), z, y)
    ref, ref_grad = 0.0, np.zeros_like(z)
    for i in range(n):
        s = _softmax(z[i])
        p = s[y[i]]
        ref += -((1 - p) ** gamma) * math.log(p) / n  # Lin et al. Eq. 5 (alpha = 1)
        # dFL/dp = gamma (1-p)^(gamma-1) log p - (1-p)^gamma / p;  dp/dz_k = p ([k = y] - s_k)
        dfl_dp = (gamma * (1 - p) ** (gamma - 1) * math.log(p) if gamma else 0.0) - (1 - p) ** gamma / p
        ref_grad[i] = dfl_dp * p * (np.eye(c)[y[i]] - s) / n
    assert value == pytest.approx(ref, abs=1e-10)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-12)


def test_focal_with_gamma_zero_is_softmax_cross_entropy(rng):
    z, y, _, ps = _batch(rng)
    zt, yt = torch.tensor(z), torch.tensor(y)
    assert build_loss("focal", ps, gamma=0.0)(zt, yt).item() == pytest.approx(build_loss("softmax", ps)(zt, yt).item())


# ---------- LDAM-DRW ----------

def ref_ldam(cos, y, counts, max_margin, s, weights):
    """Cao et al. Eq. 12-13: margins max_margin * (n_min / n_c)^(1/4); weighted CE of s (cos - m_y e_y)."""
    n, c = cos.shape
    m = max_margin * (counts.min() / counts) ** 0.25
    num, den, grad = 0.0, 0.0, np.zeros_like(cos)
    wsum = sum(weights[y[i]] for i in range(n))
    for i in range(n):
        o = s * (cos[i] - m[y[i]] * np.eye(c)[y[i]])
        num += weights[y[i]] * (_lse(o) - o[y[i]])
        den += weights[y[i]]
        grad[i] = s * weights[y[i]] * (_softmax(o) - np.eye(c)[y[i]]) / wsum
    return num / den, grad


@pytest.mark.parametrize("drw", [False, True])
def test_ldam_drw_value_and_gradient(rng, drw):
    _, y, counts, ps = _batch(rng, n=16, c=6)
    cos = rng.uniform(-1, 1, size=(16, 6))
    loss = build_loss("ldam_drw", ps, train_counts=counts.tolist(), max_margin=0.5, scale=30.0, drw_epoch=3,
                      beta=0.9999)
    loss.set_epoch(3 if drw else 2)
    value, grad = _value_and_grad(loss, cos, y)
    if drw:  # Cui et al. 2019: (1 - beta) / (1 - beta^n_c), normalized to sum to C
        w = (1 - 0.9999) / (1 - 0.9999 ** counts.astype(np.float64))
        w = w / w.sum() * len(counts)
    else:
        w = np.ones(len(counts))
    ref, ref_grad = ref_ldam(cos, y, counts, 0.5, 30.0, w)
    assert value == pytest.approx(ref, rel=1e-10)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-10)
    assert loss.last_terms["drw"].item() == float(drw)


def test_ldam_margins_and_cosine_head(rng):
    counts = np.array([400, 100, 25, 4])
    loss = build_loss("ldam_drw", counts / counts.sum(), train_counts=counts.tolist())
    np.testing.assert_allclose(loss.margins.numpy(), 0.5 * (4 / counts) ** 0.25)
    assert loss.margins.max().item() == pytest.approx(0.5)  # the largest margin, on the rarest class
    head = build_model("resnet32", 4, head=loss.head).fc
    assert isinstance(head, CosineClassifier)
    x = torch.randn(5, 64)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).t()
    head.train()
    torch.testing.assert_close(head(x), cos)  # what the loss takes
    head.eval()
    torch.testing.assert_close(head(x), 30.0 * cos)  # the logits the loss trained softmax on


# ---------- Causal Norm ----------

def ref_causal_norm(x, w, d, tau, gamma, k, alpha, tde):
    """Tang et al. Eq. 3 (training) and Eq. 7 (TDE), head by head, written with loops."""
    n, dim = x.shape
    c, h = w.shape[0], dim // k
    out = np.zeros((n, c))
    for i in range(n):
        for cls in range(c):
            total = 0.0
            for j in range(k):
                xs, ws = x[i, j * h:(j + 1) * h], w[cls, j * h:(j + 1) * h]
                xn = xs / np.linalg.norm(xs)
                wn = ws / (np.linalg.norm(ws) + gamma)
                if tde:
                    dn = d[j * h:(j + 1) * h] / np.linalg.norm(d[j * h:(j + 1) * h])
                    cos = float(xn @ dn)
                    xn = xn - alpha * cos * dn
                total += float(wn @ xn)
            out[i, cls] = tau / k * total
    return out


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_causal_norm_head_training_and_tde_logits(rng, heads):
    torch.manual_seed(0)
    head = CausalNormClassifier(8, 5, tau=16.0, gamma=1 / 32, heads=heads, alpha=1.5).double()
    x1, x2, x3 = (torch.tensor(rng.normal(size=(6, 8)) + 0.5) for _ in range(3))
    head.train()
    out = head(x1)
    ref = ref_causal_norm(x1.numpy(), head.weight.detach().numpy(), None, 16.0, 1 / 32, heads, 1.5, tde=False)
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-10)
    head(x2)
    # The moving-average direction, as the authors' code accumulates it: d <- 0.9 d + mean_batch(x).
    d_ref = 0.9 * x1.numpy().mean(0) + x2.numpy().mean(0)
    np.testing.assert_allclose(head.feature_direction.numpy(), d_ref, atol=1e-12)
    head.eval()
    tde = head(x3)
    ref = ref_causal_norm(x3.numpy(), head.weight.detach().numpy(), d_ref, 16.0, 1 / 32, heads, 1.5, tde=True)
    np.testing.assert_allclose(tde.detach().numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(head.feature_direction.numpy(), d_ref, atol=1e-12)  # inference does not move it


def test_causal_norm_gradients_and_loss(rng):
    head = CausalNormClassifier(6, 3, heads=2).double().train()
    x = torch.tensor(rng.normal(size=(4, 6)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _cn_forward(head, x, w), (x, head.weight))
    z, y, _, ps = _batch(rng, n=4, c=3)
    value, grad = _value_and_grad(build_loss("causal_norm", ps), z, y)  # the loss is plain CE on the head's logits
    assert value == pytest.approx(sum(_lse(z[i]) - z[i, y[i]] for i in range(4)) / 4, abs=1e-10)
    np.testing.assert_allclose(grad, np.stack([(_softmax(z[i]) - np.eye(3)[y[i]]) / 4 for i in range(4)]), atol=1e-12)


def _cn_forward(head, x, w):
    saved = head.weight
    del head.weight
    head.weight = w
    try:
        return head(x)
    finally:
        del head.weight
        head.weight = saved


def test_causal_norm_model_without_its_feature_direction_is_refused():
    model = build_model("resnet32", 4, head=classifier_head("causal_norm", [0.25] * 4))
    state = model.state_dict()
    with pytest.raises(ValueError, match="no saved feature direction .*zero"):
        check_head_state("causal_norm", state)  # never trained: d = 0
    state.pop("fc.feature_direction")
    with pytest.raises(ValueError, match="no saved feature direction .*missing"):
        check_head_state("causal_norm", state)
    state["fc.feature_direction"] = torch.ones(64)
    check_head_state("causal_norm", state)


# ---------- τ-normalized classifier ----------

@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.7])
def test_tau_normalized_logits_from_stored_logits_equal_rescaled_weights(rng, tau):
    """Kang et al. 2020: logits with weights w_c / |w_c|^tau, computed from the features; the stored-logit form must
    match without seeing the features."""
    f = rng.normal(size=(9, 7))
    w, b = rng.normal(size=(5, 7)) * rng.uniform(0.2, 3, size=(5, 1)), rng.normal(size=5)
    z = f @ w.T + b
    ref = f @ (w / np.linalg.norm(w, axis=1, keepdims=True) ** tau).T
    out = tau_normalize(torch.tensor(z), torch.tensor(w), torch.tensor(b), tau)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-10)
    with pytest.raises(ValueError, match="tau >= 0"):
        tau_normalize(torch.tensor(z), torch.tensor(w), None, -1)


# ---------- post-hoc logit adjustment (Menon et al. 2021) and choosing tau on validation ----------

@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5])
def test_post_hoc_logit_adjustment_formula_and_tau_one_is_pc(rng, tau):
    from lade_core.math.posthoc import compensate, logit_adjust

    z, _, _, ps = _batch(rng)
    pt = rng.dirichlet(np.ones(len(ps)))
    out = logit_adjust(torch.tensor(z), ps, pt, tau).numpy()
    np.testing.assert_allclose(out, z - tau * np.log(ps) + np.log(pt), atol=1e-12)
    if tau == 1.0:
        np.testing.assert_allclose(out, compensate(torch.tensor(z), ps, pt).numpy(), atol=1e-12)


def test_select_tau_picks_the_best_validation_top1_and_the_smallest_on_ties():
    from lade_core.math.evaluation import select_tau

    # Validation logits that classify every sample right only for tau in {0.6, 0.7, 0.8}, and at chance otherwise.
    zv = torch.tensor([[0.0, 0.0]] * 4, dtype=torch.float64)
    yv = torch.tensor([0, 1, 0, 1])
    margin = {0.6: 1, 0.7: 1, 0.8: 1}  # three tied taus: the smallest wins
    at = lambda z, t: z + torch.tensor([[margin.get(t, 0), 0], [0, margin.get(t, 0)]] * 2, dtype=z.dtype)  # noqa: E731
    assert select_tau(zv, yv, at) == 0.6


# ---------- the registry ----------

def test_every_loss_builds_its_head_and_trains_a_step(rng):
    counts = [60, 30, 10, 5]
    ps = np.array(counts) / sum(counts)
    for name in LOSSES:
        loss = build_loss(name, ps, train_counts=counts)
        model = build_model("resnet32", 4, head=loss.head).train()
        x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 0, 1, 2, 3, 0, 1, 2])
        out = loss(model(x), y)
        out.backward()
        assert torch.isfinite(out) and model.fc.weight.grad is not None, name
        assert all(torch.isfinite(v) for v in loss.last_terms.values()), name


@pytest.mark.parametrize("name, kwargs, match", [
    ("focal", {"gamma": -1.0}, r"focal gamma \(γ\) must be a finite number >= 0, got -1.0"),
    ("ldam_drw", {"scale": -30.0}, r"ldam_drw scale \(s\) must be a finite number > 0, got -30.0"),
    ("ldam_drw", {"max_margin": 0.0}, r"ldam_drw max_margin must be a finite number > 0"),
    ("ldam_drw", {"beta": 1.0}, r"ldam_drw beta \(β\) must be a finite number >= 0 and < 1"),
    ("ldam_drw", {"drw_epoch": -1}, r"ldam_drw drw_epoch must be an integer >= 0"),
    ("logit_adjusted", {"tau": -0.5}, r"logit_adjusted tau \(τ\) must be a finite number >= 0"),
    ("causal_norm", {"tau": 0.0}, r"causal_norm tau \(τ\) must be a finite number > 0"),
    ("causal_norm", {"heads": 0}, r"causal_norm heads must be an integer >= 1"),
    ("causal_norm", {"gamma": float("nan")}, r"causal_norm gamma \(γ\) must be a finite number >= 0"),
])
def test_peers_refuse_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(name, [0.5, 0.3, 0.2], train_counts=[50, 30, 20], **kwargs)


def test_ldam_needs_counts_and_causal_norm_heads_must_divide_the_features():
    with pytest.raises(ValueError, match="ldam_drw needs the training class counts"):
        build_loss("ldam_drw", [0.5, 0.5])
    with pytest.raises(ValueError, match="heads must be a positive integer dividing the feature dimension 64"):
        build_model("resnet32", 3, head=classifier_head("causal_norm", [0.5, 0.3, 0.2], heads=3))
