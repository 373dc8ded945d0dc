import numpy as np
import pytest
import torch

from lade_core.math.posthoc import compensate, inject_prior, pc_softmax, posthoc_logits


def test_compensate_and_inject_match_formulas(rng):
    z = rng.normal(size=(9, 5))
    ps = rng.dirichlet(np.ones(5))
    pt = rng.dirichlet(np.ones(5))
    out = compensate(torch.tensor(z), ps, pt).numpy()
    np.testing.assert_allclose(out, z - np.log(ps) + np.log(pt), atol=1e-12)
    np.testing.assert_allclose(inject_prior(torch.tensor(z), pt).numpy(), z + np.log(pt), atol=1e-12)
    probs = pc_softmax(torch.tensor(z), ps, pt).numpy()
    e = np.exp(z) * pt / ps
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), atol=1e-12)


def test_compensate_with_target_equal_source_is_identity(rng):
    z = torch.tensor(rng.normal(size=(4, 7)))
    ps = rng.dirichlet(np.ones(7))
    assert torch.allclose(compensate(z, ps, ps), z, atol=1e-12)


def test_posthoc_rejects_bad_priors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="target_prior has wrong length"):
        inject_prior(z, [0.5, 0.5])
    with pytest.raises(ValueError, match="source_prior is negative"):
        compensate(z, [1.2, -0.2, 0.0], [1 / 3] * 3)
    with pytest.raises(ValueError, match="unknown post-hoc rule"):
        posthoc_logits(z, "bogus", [1 / 3] * 3, [1 / 3] * 3)


def test_primary_posthoc_mode_per_loss():
    from lade_core.methods import LOSSES, posthoc_rules

    assert {loss: posthoc_rules(loss)[0] for loss in LOSSES} == {
        "softmax": "pc", "balanced_softmax": "inject", "lade": "inject", "logit_adjusted": "inject", "focal": "pc",
        "ldam_drw": "inject", "causal_norm": "inject", "sade": "inject", "balpoe": "inject"}
    assert all("raw" in posthoc_rules(loss) for loss in LOSSES)
