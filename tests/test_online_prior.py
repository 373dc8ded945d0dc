"""The online target-prior estimate (``OnlinePrior``): the estimate against EM written out over the last
window, convergence to the true mix, tracking a change of mix, and bad input refused."""
import math

import pytest
import torch

from lade_core.math.label_shift import OnlinePrior
from lade_core.math.priors import long_tailed_counts, prior_from_counts

C, DIM = 6, 8


def _stream(prior: torch.Tensor, n: int, source_prior: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of a target mix ``prior`` from class-conditional Gaussians N(mu_y, I): (labels [n], the exact source
    posteriors p_s(y|x) [n, C]), calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.9 * torch.randn(C, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.multinomial(prior, n, replacement=True, generator=g)
    x = mu[y] + torch.randn(n, DIM, generator=g, dtype=torch.float64)
    log_lik = -0.5 * ((x[:, None, :] - mu[None]) ** 2).sum(-1)  # [n, C]
    return y, torch.softmax(log_lik + source_prior.log(), 1)


def _source() -> torch.Tensor:
    return prior_from_counts(long_tailed_counts(C, 500, 10))


def _em_oracle(posteriors: torch.Tensor, source_prior: torch.Tensor, iterations: int = 5000) -> list[float]:
    """Saerens et al.'s EM written out in plain Python floats (no tensors), to its fixed point."""
    rows = posteriors.tolist()
    ps = source_prior.tolist()
    q = ps[:]
    for _ in range(iterations):
        acc = [0.0] * len(ps)
        for row in rows:
            w = [r * qc / pc for r, qc, pc in zip(row, q, ps)]
            total = sum(w)
            acc = [a + v / total for a, v in zip(acc, w)]
        q = [a / len(rows) for a in acc]
    return q


def test_the_estimate_is_em_over_the_last_window_of_images():
    ps = _source()
    _, post = _stream(torch.flip(ps, [0]), 130, ps, seed=1)
    online = OnlinePrior(ps, window=50, warmup=10, em_steps=100000, tol=1e-13, change_test=None)
    for b in (post[:5], post[5:6], post[6:90], post[90:130]):  # uneven batches, one longer than the window
        online.update(b)
    assert online.prior.tolist() == pytest.approx(_em_oracle(post[-50:], ps), abs=1e-9)
    assert online.seen == 130 and online.trusted
    state = online.state()
    assert state["n"] == 50 and state["std"] == pytest.approx(
        [math.sqrt(v * (1 - v) / 50) for v in online.prior.tolist()], rel=1e-12)


def test_a_fixed_mix_converges_to_the_true_prior():
    ps = _source()
    target = torch.flip(ps, [0])  # backward: the tail classes are now the head
    _, post = _stream(target, 6000, ps, seed=2)
    online = OnlinePrior(ps, window=4000)
    for b in post.split(50):
        online.update(b)
    assert float((online.prior - target).abs().sum()) / 2 < 0.04
    mean_posterior = post[-4000:].mean(0)  # what an estimate without EM's correction would give
    assert float((mean_posterior - target).abs().sum()) / 2 > 0.1
    assert float((ps - target).abs().sum()) / 2 > 0.4  # far from where it started


def test_it_tracks_a_change_of_mix_and_reset_forgets():
    ps = _source()
    online = OnlinePrior(ps, window=1000, warmup=300)
    assert not online.trusted and online.prior.tolist() == ps.tolist()
    _, first = _stream(ps, 300, ps, seed=3)
    for b in first.split(100)[:2]:
        online.update(b)
    assert not online.trusted  # 200 images: under the warm-up
    online.update(first[200:])
    assert online.trusted
    _, shifted = _stream(torch.flip(ps, [0]), 3000, ps, seed=4)
    tv = []
    for b in shifted.split(100):
        online.update(b)
        tv.append(float((online.prior - torch.flip(ps, [0])).abs().sum()) / 2)
    # Far right after the change; once the window has left the old mix, within sampling noise of the new one.
    assert tv[0] > 0.3 and max(tv[-10:]) < 0.1 and tv[-1] < tv[0] / 5
    online.reset()
    assert online.seen == 0 and not online.trusted and online.prior.tolist() == ps.tolist()


def test_an_abrupt_change_is_detected_soon_and_a_steady_mix_never_is():
    ps = _source()
    online = OnlinePrior(ps)  # window 500, the newest 200 images tested each batch
    _, steady = _stream(ps, 4000, ps, seed=5)
    for b in steady.split(32):
        online.update(b)
    assert online.changes == 0 and online.state()["n"] == 500  # no false alarm over 4000 images
    _, shifted = _stream(torch.flip(ps, [0]), 400, ps, seed=6)
    cut_at = None
    for i, b in enumerate(shifted.split(32)):
        online.update(b)
        if online.changes and cut_at is None:
            cut_at, n_after = 32 * (i + 1), online.state()["n"]
    assert cut_at is not None and cut_at <= 200 and n_after == 200  # the buffer keeps only the newest 200
    assert float((online.prior - torch.flip(ps, [0])).abs().sum()) / 2 < 0.15  # already near the new mix
    off = OnlinePrior(ps, change_test=None)
    for b in (*steady[-500:].split(32), *shifted.split(32)):
        off.update(b)
    assert off.changes == 0 and off.state()["n"] == 500  # without the test: the window only


@pytest.mark.parametrize("make, message", [
    (lambda: OnlinePrior([0.5, 0.5, 0.0]), "source_prior is 0 at class indices \\[2\\]"),
    (lambda: OnlinePrior([0.5, 0.6]), "source_prior"),
    (lambda: OnlinePrior([0.5, 0.5], window=0), "window must be an integer >= 1, got 0"),
    (lambda: OnlinePrior([0.5, 0.5], warmup=2.5), "warmup must be an integer >= 0, got 2.5"),
    (lambda: OnlinePrior([0.5, 0.5], change_test=0), "change_test must be a number of standard deviations > 0"),
    (lambda: OnlinePrior([0.5, 0.5]).update(torch.ones(3, 3)), "posteriors must be \\[B, 2\\]"),
    (lambda: OnlinePrior([0.5, 0.5]).update(torch.tensor([[0.5, float("nan")]])), "finite, non-negative"),
])
def test_bad_input_is_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()
