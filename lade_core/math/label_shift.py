"""Estimating the target prior p_t(y) from unlabeled target data, to inject it where the paper assumes it known
(Eq. 6 / Eq. 17). torch/numpy only.

Every estimator starts from the model's *source* posteriors p_s(y|x). Which those are depends on the loss that
produced the logits, through its post-hoc rule evaluated at p_t = p_s (``source_logits``):
  - plain softmax (rule ``pc``): logits - log p_s + log p_s = the logits; p_s(y|x) = softmax(z);
  - LADE / Balanced Softmax (rule ``inject``): z + log p_s (Eq. 17 with p_t = p_s).

- **BCTS** (bias-corrected temperature scaling; Alexandari et al., ICML 2020): softmax(z_s / T + b), T > 0, b [C],
  fitted by NLL on labeled validation data from the source distribution (``fit_bcts``).
- **EM / MLLS** (Saerens et al., 2002): the maximum-likelihood p_t as the fixed point of
      w = p_t / p_s;  q_i(y) = p_s(y|x_i) w(y) / sum_k p_s(k|x_i) w(k);  p_t(y) = mean_i q_i(y).
- **MAPLS** (Ye et al., WACV 2024; ``ChangkunYe/MAPLS``, ``label_shift/mapls.py``): EM whose M-step is shrunk
  toward the uniform prior u with a weight lambda set from the data, which steadies EM with many classes and few
  target images:
      p_t <- lambda * mean_i q_i + (1 - lambda) * u,
      lambda = 0.9 * TU + 0.1 * (1 - TS), TU = f(KL(p_mlls || u), g), TS = f(KL(p_mlls || p_s), g),
      f(d, g) = g d / (1 + g d),  g = (1 / (1 - SU) - 1) / 0.5,  SU = 1 - f(KL(p_s || u), (1 / 0.8 - 1) / 0.5),
  where p_mlls is plain EM after the same number of iterations (``mapls_lambda``). lambda depends on divergences,
  not on the number of images, so MAPLS stays shrunk toward uniform however many images it sees: below EM's error
  with many classes and few images, above it with many images (both tested).
- **Dirichlet MAP** (``dirichlet``): MAPLS's MAP estimate with a Dirichlet prior of *fixed* strength: kappa
  pseudo-images spread uniformly (alpha_c = 1 + kappa / C; default kappa = C, one per class), the EM fixed point of
      p_t(y) = (sum_i q_i(y) + kappa / C) / (N + kappa),
  i.e. MAPLS's shrunk M-step with lambda = N / (N + kappa): steady with few images, and converging to EM as N grows
  (an absent class keeps (kappa / C) / (N + kappa), not MAPLS's (1 - lambda) / C).
- **auto**: the one of EM, MAPLS and the Dirichlet MAP whose estimates best predict held-out target images: 5-fold
  cross-validated log-likelihood l(p_t) = sum_i log sum_y p_s(y|x_i) p_t(y) / p_s(y) of each fold under the
  estimate from the other four (``select_method``). Label-free; on synthetic long-tailed targets (10 and 100
  classes, 1 to 40 images per class, Dirichlet, shifted and knock-out targets) its mean total-variation regret to
  the best of the three was 0.011, against 0.017 (Dirichlet), 0.051 (MAPLS) and 0.064 (EM) (bench/README.md).
- **BBSE** (Lipton et al., 2018): with the validation joint confusion matrix C[i, j] = P(yhat = i, y = j) and the
  target's predicted-label distribution mu[i] = P(yhat = i), solve C w = mu; p_t = clip(w, 0) * p_val, normalized.
- **Intervals** (``estimate_target_prior(..., interval=0.9)``): percentile bootstrap over the target images (the
  estimator rerun on resamples with replacement, the calibration held fixed), per class, and for the label-free
  expected accuracy gain of injecting the estimate over the uniform prior (``expected_gain``).
- A class absent from the target gets an estimate near 0 (EM and MAPLS divide only by p_s and by row sums that
  stay positive).
- **Online** (``OnlinePrior``; online label-shift adaptation, Wu et al. 2021): EM over a sliding window of the
  stream's posteriors, warm-started from the last estimate after each batch: the maximum-likelihood mix of the
  recent traffic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lade_core.math.posthoc import posthoc_logits
from lade_core.math.priors import validate_prior
from lade_core.registry import Registry

__all__ = ["CALIBRATIONS", "METHODS", "Calibration", "source_logits", "fit_bcts", "fit_calibration", "auto_calibration",
           "resolve_calibration", "calibrate", "em_prior", "mapls_lambda", "mapls_prior", "dirichlet_prior",
           "log_likelihood", "select_method", "bbse_prior", "expected_gain", "estimate_target_prior", "OnlinePrior"]

CALIBRATIONS = (None, "bcts", "auto")


def source_logits(logits: torch.Tensor, source_prior, loss: str | None = None, *, rule: str | None = None
                  ) -> torch.Tensor:
    """Logits [N, C] -> float64 logits whose softmax is the model's source posterior p_s(y|x): the post-hoc rule
    with p_t = p_s — ``rule`` where the caller has it (a model card's), else the loss's own."""
    if rule is None:
        from lade_core.methods import default_rule  # lazily: the declarations import no estimator

        rule = default_rule(loss)
    z = logits.double()
    return z if rule == "raw" else posthoc_logits(z, rule, source_prior, source_prior)


def fit_bcts(val_logits: torch.Tensor, val_labels: torch.Tensor, shift: torch.Tensor | None = None,
             max_iter: int = 200) -> tuple[float, torch.Tensor]:
    """BCTS: (temperature T, bias b [C] float64) minimizing the NLL of softmax(z / T + b + shift) on validation
    logits [N, C] (source-posterior logits, see ``source_logits``) and labels [N]; ``shift`` [C] (default 0) is a
    known per-class offset held fixed. L-BFGS in float64 over (log T, b)."""
    z = val_logits.double()
    y = torch.as_tensor(val_labels, dtype=torch.int64)
    if z.ndim != 2 or len(y) != len(z) or len(y) == 0:
        raise ValueError(f"fit_bcts needs validation logits [N, C] and N labels, N > 0; got {tuple(z.shape)} and "
                         f"{tuple(y.shape)}")
    shift = torch.zeros(z.shape[1], dtype=torch.float64) if shift is None else shift.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # b is defined up to a constant shift (softmax is shift-invariant); the tiny ridge pins it near 0.
        loss = torch.nn.functional.cross_entropy(z / log_t.exp() + b + shift, y) + 1e-8 * (b ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp()), (b - b.mean()).detach()


# BCTS fits C + 1 parameters on the validation split. On a trained ResNet-32 (the embedded default, 10 classes,
# 20 validation images per class) EM on raw LADE posteriors is far off (overconfident: top-1 with the estimate
# 0.58 of top-1 with the true prior at backward 50) and BCTS repairs it (>= 0.99 on all 11 targets). On the
# already-calibrated linear models of bench/bayes_gap.py (50 classes) BCTS on 20 per class costs 3-5 %, and helps
# from 200 per class. A deep network is the case lade serves: "auto" calibrates from this many images per class.
BCTS_MIN_PER_CLASS = 10


@dataclass(frozen=True)
class Calibration:
    """A fitted BCTS: calibrated source posteriors softmax(z / T + b), which refer to the source prior.

    Why "refer to the source prior": a validation split is usually class-balanced, not drawn from p_s. The fit
    holds the known offset log p_val - log p_s fixed (``fit_calibration``), so b is the calibration alone, and EM
    starts from p_s as it does for uncalibrated posteriors."""

    temperature: float
    bias: torch.Tensor  # [C] float64

    def posteriors(self, z_source: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z_source.double() / self.temperature + self.bias.to(torch.float64), 1)

    def to_dict(self) -> dict:
        return {"temperature": float(self.temperature), "bias": [float(x) for x in self.bias]}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["temperature"]), torch.tensor(d["bias"], dtype=torch.float64))


def fit_calibration(val_source_logits: torch.Tensor, val_labels: torch.Tensor, source_prior) -> Calibration:
    """BCTS on validation source-posterior logits [N, C] whose labels follow their own frequencies p_val: the fit
    models p_val(y|x) = softmax(z / T + b + log p_val - log p_s), so that softmax(z / T + b) refers to p_s."""
    c = val_source_logits.shape[1]
    ps = validate_prior(source_prior, c, "source_prior")
    p_val = torch.bincount(torch.as_tensor(val_labels, dtype=torch.int64), minlength=c).double() / len(val_labels)
    return Calibration(*fit_bcts(val_source_logits, val_labels, shift=p_val.log() - ps.log()))


def auto_calibration(val_source_logits: torch.Tensor | None, val_labels: torch.Tensor | None,
                     source_prior) -> Calibration | None:
    """BCTS when the validation split has at least ``BCTS_MIN_PER_CLASS`` images per class on average, else None."""
    if val_source_logits is None or val_labels is None:
        return None
    if len(val_labels) < BCTS_MIN_PER_CLASS * val_source_logits.shape[1]:
        return None
    return fit_calibration(val_source_logits, val_labels, source_prior)


def resolve_calibration(calibration: str | Calibration | None, val_source_logits: torch.Tensor | None,
                        val_labels: torch.Tensor | None, source_prior) -> Calibration | None:
    """A ``calibration`` argument (None, "bcts", "auto" or a fitted ``Calibration``) -> the Calibration to use."""
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; choose None, 'bcts', 'auto' or a fitted Calibration")
    if calibration == "auto":
        return auto_calibration(val_source_logits, val_labels, source_prior)
    if val_source_logits is None or val_labels is None:
        raise ValueError("BCTS calibration needs validation logits and labels")
    return fit_calibration(val_source_logits, val_labels, source_prior)


def calibrate(z_source: torch.Tensor, calibration: Calibration | None) -> torch.Tensor:
    """Calibrated source posteriors [N, C] float64, or softmax(z) without a calibration."""
    return torch.softmax(z_source.double(), 1) if calibration is None else calibration.posteriors(z_source)


def em_prior(posteriors: torch.Tensor, source_prior, tol: float = 1e-8, max_iter: int = 10_000,
             start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """MLLS / EM (Saerens et al. 2002) on source posteriors [N, C] from ``start`` (default p_s): the target prior
    [C] float64 and {"iterations", "converged"}. The Dirichlet MAP with no pseudo-images (kappa = 0)."""
    p = posteriors.double()
    return _em_fixed_point(p, validate_prior(source_prior, p.shape[1], "source_prior"), 0.0, tol, max_iter, start)


def _em_fixed_point(p: torch.Tensor, ps: torch.Tensor, kappa: float, tol: float, max_iter: int,
                    start: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """EM's fixed point with kappa uniform pseudo-images added in the M-step (the module docstring's Dirichlet MAP;
    kappa = 0: plain EM), from ``start`` (default p_s) until the estimate moves less than ``tol``."""
    n, c = p.shape
    pt = ps.clone() if start is None else torch.as_tensor(start, dtype=torch.float64).clone()
    for it in range(1, max_iter + 1):
        q = _reweighted(p, pt / ps)  # E-step: posteriors re-weighted to the current target prior, [N, C]
        new = (q.sum(0) + kappa / c) / (n + kappa)  # M-step (kappa = 0: the mean of q)
        done = float((new - pt).abs().max()) < tol
        pt = new
        if done:
            return pt, {"iterations": it, "converged": True}
    return pt, {"iterations": max_iter, "converged": False}


def _reweighted(posteriors: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q_i(y) = p_s(y|x_i) w(y) / sum_k p_s(k|x_i) w(k), [N, C]. A row whose every re-weighted entry underflows
    (its classes' estimates all ~0) keeps its posteriors instead of becoming 0/0."""
    q = posteriors * w
    total = q.sum(1, keepdim=True)
    return torch.where(total > 0, q / total.clamp_min(torch.finfo(q.dtype).tiny), posteriors)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) with 0 log 0 = 0 and q + 1e-8, as MAPLS's ``kl_div``."""
    q = q + 1e-8
    return float(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300) / q), torch.zeros_like(p)).sum())


def mapls_lambda(posteriors: torch.Tensor, source_prior, max_iter: int = 100) -> float:
    """MAPLS's shrinkage weight lambda in [0, 1] (the module docstring's formula; ``get_lamda`` of the official
    code): near 1 where plain EM moves far from uniform, smaller where the source prior is far from uniform but EM
    stays near it."""
    p = posteriors.double()
    ps = validate_prior(source_prior, p.shape[1], "source_prior")
    u = torch.full_like(ps, 1 / len(ps))
    mlls, _ = em_prior(p, ps, tol=0.0, max_iter=max_iter)  # tol 0: exactly max_iter steps, as the reference

    def f(d: float, g: float) -> float:
        return g * d / (1 + g * d)

    def g_of(lam: float, d: float = 0.5) -> float:
        return (1 / (1 - lam) - 1) / d

    su = 1 - f(_kl(ps, u), g_of(0.2))
    tu, ts = f(_kl(mlls, u), g_of(su)), f(_kl(mlls, ps), g_of(su))
    return 0.9 * tu + 0.1 * (1 - ts)


def mapls_prior(posteriors: torch.Tensor, source_prior, lam: float | None = None, max_iter: int = 100
                ) -> tuple[torch.Tensor, dict]:
    """MAPLS (Ye et al., WACV 2024) on source posteriors [N, C]: ``max_iter`` EM steps from p_s with the M-step
    shrunk toward uniform, p_t <- lam * mean_i q_i + (1 - lam) / C (``lam`` default ``mapls_lambda``). Returns the
    target prior [C] float64 and {"lambda", "iterations"}."""
    p = posteriors.double()
    ps = validate_prior(source_prior, p.shape[1], "source_prior")
    if lam is None:
        lam = mapls_lambda(p, ps, max_iter)
    elif not 0 <= lam <= 1:
        raise ValueError(f"MAPLS lambda must be in [0, 1], got {lam}")
    pt = ps.clone()
    for _ in range(max_iter):
        pt = lam * _reweighted(p, pt / ps).mean(0) + (1 - lam) / len(ps)
        pt = pt / pt.sum()
    return pt, {"lambda": float(lam), "iterations": max_iter}


def dirichlet_prior(posteriors: torch.Tensor, source_prior, pseudo_counts: float | None = None, tol: float = 1e-8,
                    max_iter: int = 10_000, start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The MAP target prior [C] float64 under a uniform Dirichlet prior of ``pseudo_counts`` (kappa, default C)
    pseudo-images, on source posteriors [N, C]: EM whose M-step is p_t = (sum_i q_i + kappa / C) / (N + kappa)
    (the module docstring), from ``start`` (default p_s) until it moves less than ``tol``. The objective, the
    log-likelihood plus the Dirichlet's log density with every alpha_c >= 1, is concave: a warm start changes the
    iterations, not the maximum. Returns (prior, {"pseudo_counts", "iterations", "converged"})."""
    p = posteriors.double()
    c = p.shape[1]
    ps = validate_prior(source_prior, c, "source_prior")
    kappa = float(c if pseudo_counts is None else pseudo_counts)
    if not kappa >= 0:
        raise ValueError(f"pseudo_counts must be >= 0, got {pseudo_counts!r}")
    pt, info = _em_fixed_point(p, ps, kappa, tol, max_iter, start)
    return pt, {"pseudo_counts": kappa, **info}


def log_likelihood(posteriors: torch.Tensor, source_prior, prior: torch.Tensor) -> float:
    """l(p_t) = sum_i log sum_y p_s(y|x_i) p_t(y) / p_s(y): the log-likelihood of the images under the prior
    ``prior`` (up to a term free of it), what EM maximizes. A row the prior gives no mass counts as log(tiny)."""
    p = posteriors.double()
    ratio = torch.as_tensor(prior, dtype=torch.float64) / torch.as_tensor(source_prior, dtype=torch.float64)
    return float(torch.log((p * ratio).sum(1).clamp_min(torch.finfo(torch.float64).tiny)).sum())


# The estimators that need no labels (what ``auto`` chooses among, in this order), each as
# fn(posteriors [N, C], p_s [C], start [C] or None, tol) -> (prior [C], diagnostics).
LABEL_FREE: Registry[Callable] = Registry("label-free prior estimation method", {
    # the likelihood is concave: a warm start changes the iterations, not the maximum
    "em": lambda post, ps, start, tol: em_prior(post, ps, tol=tol, start=start),
    # a fixed number of steps from p_s, as the reference: no warm start
    "mapls": lambda post, ps, start, tol: mapls_prior(post, ps),
    "dirichlet": lambda post, ps, start, tol: dirichlet_prior(post, ps, tol=tol, start=start),
})


def _label_free(method: str, posteriors: torch.Tensor, ps: torch.Tensor, start: torch.Tensor | None = None,
                tol: float = 1e-8) -> tuple[torch.Tensor, dict]:
    return LABEL_FREE.lookup(method)(posteriors, ps, start, tol)


def select_method(posteriors: torch.Tensor, source_prior, methods: tuple[str, ...] = LABEL_FREE, folds: int = 5,
                  seed: int = 0) -> tuple[str, dict[str, float]]:
    """The estimator of ``methods`` whose estimate from the other folds gives each held-out fold of the images the
    highest log-likelihood (``log_likelihood``), summed over ``folds`` seeded random folds: (method, its score per
    method, per image). Cross-validation, not the in-sample likelihood, which plain EM maximizes by construction.
    The folds' estimates stop at a tolerance of 1e-6 (a ranking, not the estimate itself)."""
    p = posteriors.double()
    ps = validate_prior(source_prior, p.shape[1], "source_prior")
    unknown = [m for m in methods if m not in LABEL_FREE]
    if unknown or not methods:
        raise ValueError(f"select_method chooses among {list(LABEL_FREE)}; got {list(methods)}")
    if not 2 <= folds <= len(p):
        raise ValueError(f"folds must be in [2, {len(p)}] (the images), got {folds}")
    parts = torch.randperm(len(p), generator=torch.Generator().manual_seed(seed)).chunk(folds)
    scores = {}
    for m in methods:
        total = 0.0
        for k, held in enumerate(parts):
            rest = torch.cat([f for j, f in enumerate(parts) if j != k])
            total += log_likelihood(p[held], ps, _label_free(m, p[rest], ps, tol=1e-6)[0])
        scores[m] = total / len(p)
    return max(scores, key=scores.get), scores


def expected_gain(posteriors: torch.Tensor, source_prior, prior: torch.Tensor) -> float:
    """Label-free estimate of the top-1 gained by predicting under ``prior`` instead of the uniform prior, taking the
    calibrated target posteriors q(y|x) ∝ p_s(y|x) prior(y) / p_s(y) as the truth: mean_i q_i(yhat_prior(x_i)) -
    mean_i q_i(yhat_uniform(x_i)) (Eq. 17's argmax under each prior)."""
    p = posteriors.double()
    ps = validate_prior(source_prior, p.shape[1], "source_prior")
    q = _reweighted(p, prior / ps)
    balanced = p / ps  # argmax under the uniform prior
    rows = torch.arange(len(p))
    return float(q[rows, q.argmax(1)].mean() - q[rows, balanced.argmax(1)].mean())


def bbse_prior(posteriors: torch.Tensor, val_posteriors: torch.Tensor, val_labels: torch.Tensor
               ) -> tuple[torch.Tensor, dict]:
    """BBSE (Lipton et al. 2018) with hard predictions: the target prior [C] float64 and {"clipped": #classes}."""
    c = posteriors.shape[1]
    yv = torch.as_tensor(val_labels, dtype=torch.int64)
    joint = torch.zeros(c, c, dtype=torch.float64)  # [predicted, true]
    joint.index_put_((val_posteriors.argmax(1), yv), torch.ones(len(yv), dtype=torch.float64), accumulate=True)
    joint /= len(yv)
    mu = torch.bincount(posteriors.argmax(1), minlength=c).double() / len(posteriors)
    w = torch.linalg.lstsq(joint, mu.unsqueeze(1)).solution.squeeze(1)  # least squares: C may be singular
    p_val = torch.bincount(yv, minlength=c).double() / len(yv)
    pt = w.clamp_min(0) * p_val
    if float(pt.sum()) <= 0:
        raise ValueError("BBSE found no positive class weight: too few validation or target samples for this many "
                         "classes")
    return pt / pt.sum(), {"clipped": int((w < 0).sum())}


# Every estimator by name: the label-free ones, BBSE (it needs validation labels) and ``auto`` (the label-free one
# that best predicts held-out images, ``select_method``).
METHODS: Registry[Callable] = Registry("prior estimation method", {**LABEL_FREE, "bbse": bbse_prior,
                                                                   "auto": select_method})

START_FLOOR = 1e-3  # a warm start (OnlinePrior's, the bootstrap's): this share of p_s mixed into the last estimate


def estimate_target_prior(logits: torch.Tensor, source_prior, *, loss: str, method: str = "em",
                          calibration: str | Calibration | None = None,
                          val_logits: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
                          interval: float | None = None, n_boot: int = 200, seed: int = 0
                          ) -> tuple[torch.Tensor, dict]:
    """Estimate p_t [C] (float64) from unlabeled target logits [N, C] of a model trained with ``loss``.

    ``method``: ``em``, ``mapls``, ``dirichlet``, ``bbse`` or ``auto`` (the module docstring; ``auto`` chooses among
    the first three by held-out likelihood and says so in info["chosen_by"], info["method"] being the one chosen).
    ``calibration``: None (posteriors as they are), ``"bcts"`` (fitted here on ``val_logits`` / ``val_labels``),
    ``"auto"`` (BCTS only with enough validation images, ``auto_calibration``), or a fitted ``Calibration`` (a
    model card's).
    ``bbse`` needs ``val_logits`` and ``val_labels``.
    ``interval`` (a level in (0, 1)): percentile bootstrap intervals from ``n_boot`` resamples of the target images
    (generator seeded with ``seed``), in info["interval"]: {"level", "n_boot", "lower", "upper"} per class and
    "gain": the expected top-1 gain over the uniform prior (``expected_gain``) with its own interval.
    Returns (prior, info) with info: method, calibration, and the estimator's own diagnostics.
    """
    METHODS.lookup(method)  # an unknown name: one error with its close matches
    if interval is not None and not (isinstance(interval, float) and 0 < interval < 1):
        raise ValueError(f"interval must be a level in (0, 1) such as 0.9, got {interval!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 10:
        raise ValueError(f"n_boot must be an integer >= 10, got {n_boot!r}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C]; got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if n < c:
        raise ValueError(f"estimating a target prior over {c} classes needs at least {c} unlabeled samples; got {n}")
    has_val = val_logits is not None and val_labels is not None
    if method == "bbse" and not has_val:
        raise ValueError("bbse needs validation logits and labels")
    ps = validate_prior(source_prior, c, "source_prior")
    z_val = source_logits(val_logits, ps, loss) if has_val else None
    calibration = resolve_calibration(calibration, z_val, val_labels, ps)
    post = calibrate(source_logits(logits, ps, loss), calibration)
    info: dict = {"calibration": None if calibration is None else calibration.to_dict()}
    if method == "auto":
        method, scores = select_method(post, ps, seed=seed)
        info["chosen_by"] = {"rule": "5-fold held-out log-likelihood per image", "scores": scores}
    info["method"] = method
    val_post = calibrate(z_val, calibration) if method == "bbse" else None

    def estimate(rows: torch.Tensor, start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        if method == "bbse":
            return bbse_prior(rows, val_post, val_labels)
        return _label_free(method, rows, ps, start)

    prior, diag = estimate(post)
    info = {**info, **diag}
    if interval is not None:
        info["interval"] = _bootstrap(post, ps, prior, estimate, interval, n_boot, seed)
    return prior, info


def _bootstrap(post: torch.Tensor, ps: torch.Tensor, prior: torch.Tensor, estimate, level: float, n_boot: int,
               seed: int) -> dict:
    """Percentile intervals of ``estimate`` over ``n_boot`` resamples of the rows of ``post`` [N, C]."""
    gen = torch.Generator().manual_seed(seed)
    start = (1 - START_FLOOR) * prior + START_FLOOR * ps  # near the full estimate, no class at exactly 0
    priors, gains = [], []
    for _ in range(n_boot):
        rows = post[torch.randint(len(post), (len(post),), generator=gen)]
        try:
            boot, _ = estimate(rows, start)
        except ValueError:  # BBSE on a resample with no positive weight: that resample counts for nothing
            continue
        priors.append(boot)
        gains.append(expected_gain(rows, ps, boot))
    if len(priors) < n_boot // 2:
        raise ValueError(f"the bootstrap failed on {n_boot - len(priors)} of {n_boot} resamples: too few target "
                         "images for an interval")
    lo, hi = (1 - level) / 2, (1 + level) / 2
    stack, g = torch.stack(priors), torch.tensor(gains, dtype=torch.float64)
    return {"level": level, "n_boot": len(priors),
            "lower": [float(x) for x in torch.quantile(stack, lo, dim=0)],
            "upper": [float(x) for x in torch.quantile(stack, hi, dim=0)],
            "gain": {"estimate": expected_gain(post, ps, prior), "lower": float(torch.quantile(g, lo)),
                     "upper": float(torch.quantile(g, hi))}}


class OnlinePrior:
    """A running estimate of p_t from a stream of unlabeled batches: EM (``em_prior``) over the last ``window``
    images, warm-started from the previous estimate after every batch.

    The calibrated source posteriors of the last ``window`` images are kept (a ring buffer [window, C]); each
    ``update`` adds a batch and runs EM steps on the buffer from the current estimate until it moves less than
    ``tol`` (at most ``em_steps``): the estimate is the maximum-likelihood mix of the recent stream.

    A change of mix is tested for after every batch, so that the estimate need not wait for the window to leave the
    old mix: the newest ``warmup`` images' own EM estimate q_r against the window's q, by the likelihood ratio of
    those images, 2 [l(q_r) - l(q)] with l(q) = sum_i log sum_y p_i(y) q(y) / p_s(y). Without a change it is about
    chi-square with C - 1 degrees of freedom; above its mean by ``change_test`` standard deviations
    ((C - 1) + change_test * sqrt(2 (C - 1))) the buffer keeps only those newest images and q = q_r (``changes``
    counts them; ``change_test=None`` turns the test off).

    Until ``warmup`` images are in the buffer the estimate is not ``trusted`` (a caller then uses uniform). ``std``
    is the binomial standard error sqrt(q (1 - q) / n) per class over the n buffered images: the sampling noise of a
    mix that size, not the model's error. Starts from q = p_s (EM's start). Cost per update: window x C x (EM steps
    taken), twice with the change test.
    """

    def __init__(self, source_prior, window: int = 500, warmup: int = 200, em_steps: int = 50, tol: float = 1e-7,
                 change_test: float | None = 5.0):
        for name, value, low in (("window", window, 1), ("warmup", warmup, 0), ("em_steps", em_steps, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if change_test is not None and not (isinstance(change_test, (int, float)) and change_test > 0):
            raise ValueError(f"change_test must be a number of standard deviations > 0 or None, got {change_test!r}")
        self.change_test = change_test
        ps = torch.as_tensor(source_prior, dtype=torch.float64)
        self.source_prior = validate_prior(ps, ps.numel(), "source_prior")
        if bool((self.source_prior <= 0).any()):
            raise ValueError(f"source_prior is 0 at class indices "
                             f"{torch.nonzero(self.source_prior <= 0).flatten().tolist()}: every class needs p_s > 0")
        self.window, self.warmup, self.em_steps, self.tol = window, warmup, em_steps, tol
        self.reset()

    def reset(self) -> None:
        self.buffer = torch.zeros(self.window, len(self.source_prior), dtype=torch.float64)  # [window, C]
        self.filled = 0  # rows of the buffer in use
        self.next = 0  # the row the next image goes to
        self.seen = 0  # images ever given to update
        self.steps = 0  # EM steps the last update took
        self.changes = 0  # changes of mix detected (the buffer cut to its newest images)
        self._prior = self.source_prior.clone()

    @property
    def prior(self) -> torch.Tensor:
        """The current estimate q [C] (p_s before any image)."""
        return self._prior.clone()

    @property
    def trusted(self) -> bool:
        return self.filled >= max(self.warmup, 1)

    def update(self, posteriors: torch.Tensor) -> torch.Tensor:
        """Add a batch of calibrated source posteriors [B, C]; returns the new estimate."""
        p = torch.as_tensor(posteriors).double()
        c = len(self.source_prior)
        if p.ndim != 2 or p.shape[1] != c:
            raise ValueError(f"posteriors must be [B, {c}]; got shape {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool((p.sum(1) <= 0).any()):
            raise ValueError("posteriors must be finite, non-negative, and not all zero in a row")
        if len(p) == 0:
            return self.prior
        self.seen += len(p)
        p = p[-self.window:]  # a batch longer than the window: its last images
        rows = (self.next + torch.arange(len(p))) % self.window
        self.buffer[rows] = p / p.sum(1, keepdim=True)
        self.next = int(rows[-1] + 1) % self.window
        self.filled = min(self.window, self.filled + len(p))
        self._prior, diag = self._em(self.buffer[:self.filled])
        self.steps = diag["iterations"]
        self._test_for_change()
        return self.prior

    def _em(self, posteriors: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # Warm start, kept off zero: EM's update is multiplicative, so a class estimated absent would stay absent
        # when it comes back.
        start = (1 - START_FLOOR) * self._prior + START_FLOOR * self.source_prior
        return em_prior(posteriors, self.source_prior, self.tol, self.em_steps, start=start)

    def _newest(self, m: int) -> torch.Tensor:
        """The newest ``m`` buffered posteriors [m, C], oldest first."""
        return self.buffer[(self.next - m + torch.arange(m)) % self.window]

    def _loglik(self, p: torch.Tensor, q: torch.Tensor) -> float:
        return log_likelihood(p, self.source_prior, q)

    def _test_for_change(self) -> None:
        m = max(self.warmup, 1)
        if self.change_test is None or self.filled < 2 * m:
            return
        recent = self._newest(m)
        q_recent, _ = self._em(recent)
        dof = len(self.source_prior) - 1
        stat = 2 * (self._loglik(recent, q_recent) - self._loglik(recent, self._prior))
        if stat > dof + self.change_test * math.sqrt(2 * dof):
            self.buffer[:m] = recent  # a copy already (indexed by a tensor)
            self.filled, self.next = m, m % self.window
            self._prior, self.changes = q_recent, self.changes + 1

    def state(self) -> dict:
        """What ``GET /prior`` answers: the estimate, its standard error, the images it rests on."""
        q, n = self.prior, self.filled
        std = (q * (1 - q) / n).sqrt().tolist() if n > 0 else None  # None before any image (JSON has no NaN)
        return {"prior": q.tolist(), "std": std, "n": n, "seen": self.seen, "trusted": self.trusted,
                "window": self.window, "warmup": self.warmup, "changes": self.changes}
