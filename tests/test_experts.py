"""Multi-expert methods: SADE's and BalPoE's losses against float64 formulas written from their papers and released
code (values and gradients), SADE's inverse prior (rank reversal, ties), the experts' head, and bad input."""
import math

import numpy as np
import pytest
import torch

from lade_core.config.recipes import resolve_config
from lade_core.math.heads import ExpertHeads, build_head
from lade_core.math.losses import BalPoELoss, SADELoss, inverse_prior
from lade_core.methods import build_loss
from lade_core.models.backbones import ExpertStages, build_model, check_input_size, expert_outputs

EPS = 1e-9  # SADE's and BalPoE's released code: log(p + 1e-9)


def _inverse_prior_by_hand(p: list[float]) -> list[float]:
    """Rank the classes by p ascending (ties: lower index first); the class of rank r gets the value of rank C-1-r."""
    order = sorted(range(len(p)), key=lambda c: (p[c], c))
    values = [p[c] for c in order]
    rank = {c: r for r, c in enumerate(order)}
    return [values[len(p) - 1 - rank[c]] for c in range(len(p))]


def _expert_ce(z: np.ndarray, y: np.ndarray, offsets: list[list[float]]) -> tuple[list[float], np.ndarray]:
    """Per expert e: mean_n [log sum_c exp(z_nec + o_ec) - (z_ne,y + o_e,y)], in plain float64 loops; and
    d(expert e's mean)/dz [N, E, C] = (softmax(z_ne + o_e) - onehot(y)) / N."""
    n, E, C = z.shape
    losses, grad = [], np.zeros_like(z)
    for e in range(E):
        total = 0.0
        for i in range(n):
            a = [z[i, e, c] + offsets[e][c] for c in range(C)]
            m = max(a)
            lse = m + math.log(sum(math.exp(v - m) for v in a))
            total += lse - a[y[i]]
            for c in range(C):
                grad[i, e, c] = (math.exp(a[c] - lse) - (c == y[i])) / n
        losses.append(total / n)
    return losses, grad


@pytest.mark.parametrize("p", [[0.5, 0.3, 0.15, 0.05], [0.1, 0.4, 0.2, 0.3], [0.4, 0.3, 0.3], [0.25] * 4,
                               [0.2, 0.2, 0.1, 0.3, 0.2]])
def test_inverse_prior_reverses_the_ranks_and_keeps_ties_in_index_order(p):
    inv = inverse_prior(torch.tensor(p, dtype=torch.float64))
    assert inv.tolist() == _inverse_prior_by_hand(p)
    assert sorted(inv.tolist()) == sorted(p)  # the same values, permuted
    if len(set(p)) == len(p):  # without ties, SADE's own code (model/loss.py) gives the same
        value, idx0 = torch.sort(torch.tensor(p))
        _, idx1 = torch.sort(idx0)
        assert torch.allclose(value.index_select(0, len(p) - 1 - idx1).double(), inv)


def _problem(E, C=4, n=12, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(scale=2.0, size=(n, E, C)), g.integers(0, C, n)


@pytest.mark.parametrize("tau", [2.0, 0.0, 1.3])
def test_sade_loss_is_the_three_experts_cross_entropies_summed(tau):
    p = [0.5, 0.3, 0.15, 0.05]
    z, y = _problem(3)
    logp = [math.log(v + EPS) for v in p]
    loginv = [math.log(v + EPS) for v in _inverse_prior_by_hand(p)]
    offsets = [[0.0] * 4, logp, [lp - tau * li for lp, li in zip(logp, loginv)]]
    want, grad = _expert_ce(z, y, offsets)
    zt = torch.tensor(z, requires_grad=True)
    loss = SADELoss(p, tau=tau)
    out = loss(zt, torch.tensor(y))
    out.backward()
    assert math.isclose(float(out.detach()), sum(want), rel_tol=1e-12)
    np.testing.assert_allclose(zt.grad.numpy(), grad, rtol=1e-10, atol=1e-14)  # d(sum)/dz: every expert's own
    assert [float(loss.last_terms[f"expert{e}"]) for e in (1, 2, 3)] == pytest.approx(want, rel=1e-12)
    assert loss.head == ("experts", {"num_experts": 3, "expert_stages": 2})  # SADE's layout: the last 2 stages


@pytest.mark.parametrize("taus", [[0.0, 1.0, 2.0], [0.5, 1.0, 2.0], [1.0], [0.0, 2.0, 1.0, 3.0]])
def test_balpoe_loss_is_the_mean_of_logit_adjusted_cross_entropies(taus):
    p = [0.5, 0.3, 0.15, 0.05]
    z, y = _problem(len(taus), seed=1)
    logp = [math.log(v + EPS) for v in p]
    want, grad = _expert_ce(z, y, [[t * lp for lp in logp] for t in taus])
    zt = torch.tensor(z, requires_grad=True)
    loss = BalPoELoss(p, taus=taus)
    out = loss(zt, torch.tensor(y))
    out.backward()
    assert math.isclose(float(out.detach()), sum(want) / len(taus), rel_tol=1e-12)
    np.testing.assert_allclose(zt.grad.numpy(), grad / len(taus), rtol=1e-10, atol=1e-14)
    kind, kwargs = loss.head
    assert kind == "experts" and kwargs["num_experts"] == len(taus)
    # Inference logits balanced for any taus: the experts' mean + (mean tau - 1) log p_s.
    np.testing.assert_allclose(kwargs["eval_offset"], [(sum(taus) / len(taus) - 1) * lp for lp in logp], atol=1e-12)


def test_the_experts_head_trains_every_expert_and_infers_their_weighted_sum():
    torch.manual_seed(0)
    head = ExpertHeads(6, 4, num_experts=3, eval_offset=[0.1, -0.2, 0.3, 0.0])
    x = torch.randn(5, 6)
    z = head(x)  # training: [B, E, C], expert e a linear map of the shared features
    assert z.shape == (5, 3, 4)
    for e in range(3):
        torch.testing.assert_close(z[:, e], x @ head.weight[e].T + head.bias[e])
    head.eval()
    torch.testing.assert_close(head(x), z.mean(1) + torch.tensor([0.1, -0.2, 0.3, 0.0]))
    head.expert_weights.copy_(torch.tensor([0.0, 1.0, 0.0]))  # learned weights (test-time aggregation) serve as set
    torch.testing.assert_close(head(x), z[:, 1] + head.eval_offset)
    state = head.state_dict()
    assert {"expert_weights", "eval_offset", "weight", "bias"} <= set(state)
    again = build_head("experts", 6, 4, num_experts=3)
    again.load_state_dict(state)
    torch.testing.assert_close(again.eval()(x), head(x))
    # On a backbone: the model's training output is every expert's logits, its inference output [B, C].
    model = build_model("resnet32", 4, head=SADELoss([0.4, 0.3, 0.2, 0.1]).head)
    images = torch.randn(2, 3, 16, 16)
    assert model.train()(images).shape == (2, 3, 4) and model.eval()(images).shape == (2, 4)


def _expert_stages(model):
    """The ExpertStages module of a model whose experts own stages, and the model's shared parameters."""
    own = next(m for m in model.modules() if isinstance(m, ExpertStages))
    mine = {id(p) for p in own.parameters()} | {id(p) for p in model.fc.parameters()}
    return own, [p for p in model.parameters() if id(p) not in mine]


@pytest.mark.parametrize("name,stages", [("resnet32", 2), ("resnet32", 1), ("resnet32", 3), ("resnet18", 2),
                                         ("timm:test_resnet", 1)])
def test_each_expert_owns_the_last_stages_of_the_backbone(name, stages):
    torch.manual_seed(0)
    model = build_model(name, 4, head=("experts", {"num_experts": 3, "expert_stages": stages}))
    own, shared = _expert_stages(model)
    assert len(own.stages) == 3 and shared  # the early stages stay shared
    # Independently initialized experts (as SADE's), not three copies of one.
    first = [next(stage.parameters()) for stage in own.stages]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    x = torch.randn(4, 3, 32, 32)
    z = model.train()(x)  # [B, E, C]
    assert z.shape == (4, 3, 4)
    for e in range(3):  # expert e's logits depend on its own stages and the shared ones, on no other expert's
        model.zero_grad()
        z = model(x)
        z[:, e].sum().backward()
        for k, stage in enumerate(own.stages):
            moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters())
            assert moved == (k == e), (e, k)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
        grads = model.fc.weight.grad.abs().sum((1, 2))  # [E]: only expert e's classifier
        assert grads[e] > 0 and grads.sum() == grads[e]
    model.eval()
    with torch.no_grad(), expert_outputs(model):
        za = model(x)  # [B, E, C]
        x2 = x.clone()
        x2[1] += 1.0
        zb = model(x2)
    # Each image's logits are its own (the experts' rows are read back in the order they were stacked).
    torch.testing.assert_close(za[[0, 2, 3]], zb[[0, 2, 3]])
    assert not torch.allclose(za[1], zb[1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), za.mean(1))  # inference: the experts' average (SADE's fixed weights)


def test_a_checkpoint_of_the_unsplit_resnet_loads_into_every_expert(tmp_path):
    import torchvision

    torch.manual_seed(1)
    plain = torchvision.models.resnet18()
    torch.save(plain.state_dict(), tmp_path / "resnet18.pt")
    model = build_model("resnet18", 4, weights_path=str(tmp_path / "resnet18.pt"),
                        head=("experts", {"num_experts": 3, "expert_stages": 2}))
    own, _ = _expert_stages(model)
    for stage in own.stages:  # each expert starts from the file's layer3 and layer4
        for mine, theirs in zip(stage.state_dict().values(), [*plain.layer3.state_dict().values(),
                                                              *plain.layer4.state_dict().values()]):
            torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(model.backbone.conv1.weight, plain.conv1.weight)
    # lade's ResNet-32 experts are narrower than its plain stages (SADE's 3/4 width): a plain checkpoint is refused.
    plain32 = build_model("resnet32", 4)
    torch.save(plain32.state_dict(), tmp_path / "resnet32.pt")
    with pytest.raises(ValueError, match="does not match model resnet32"):
        build_model("resnet32", 4, weights_path=str(tmp_path / "resnet32.pt"), head=SADELoss([0.25] * 4).head)


def test_a_backbone_that_cannot_be_split_is_one_clear_error_and_shares_with_no_stages():
    head = BalPoELoss([0.4, 0.3, 0.2, 0.1]).head
    with pytest.raises(ValueError, match=r"model shufflenet_v2_x0_5 cannot give each expert its own last 2 stage.*"
                                         r"--expert-stages 0"):
        check_input_size("shufflenet_v2_x0_5", 4, 32, 8, head=head)  # on the driver, before any worker starts
    with pytest.raises(ValueError, match="model resnet32 cannot give each expert its own last 4 stage"):
        build_model("resnet32", 4, head=("experts", {"num_experts": 3, "expert_stages": 4}))
    shared = build_loss("balpoe", [0.4, 0.3, 0.2, 0.1], expert_stages=0).head
    model = build_model("shufflenet_v2_x0_5", 4, head=shared)
    assert not any(isinstance(m, ExpertStages) for m in model.modules())
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 3, 4)
    # A card written before experts owned stages (no expert_stages) builds the shared backbone it was trained as.
    old = build_model("resnet32", 4, head=("experts", {"num_experts": 3}))
    assert not any(isinstance(m, ExpertStages) for m in old.modules())


def test_bad_expert_input_is_one_clear_error():
    with pytest.raises(ValueError, match="num_experts >= 1"):
        ExpertHeads(6, 4, num_experts=0)
    with pytest.raises(ValueError, match="expert weights must be 3 finite numbers >= 0"):
        ExpertHeads(6, 4, num_experts=3, expert_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="expert weights must be 2 finite numbers >= 0, not all 0"):
        ExpertHeads(6, 4, num_experts=2, expert_weights=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"needs logits of shape \[N, 3, 4\] \(a model with the experts' head\)"):
        SADELoss([0.4, 0.3, 0.2, 0.1])(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="targets out of range"):
        SADELoss([0.4, 0.3, 0.2, 0.1])(torch.randn(2, 3, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="balpoe taus must be a list of one number per expert"):
        build_loss("balpoe", [0.5, 0.5], taus=[])
    with pytest.raises(ValueError, match="balpoe taus must be a list"):
        build_loss("balpoe", [0.5, 0.5], taus=2.0)
    with pytest.raises(ValueError, match=r"balpoe taus\[1\] must be a finite number"):
        build_loss("balpoe", [0.5, 0.5], taus=[1.0, float("nan")])
    with pytest.raises(ValueError, match="sade tau must be a finite number >= 0"):
        build_loss("sade", [0.5, 0.5], tau=-1.0)
    with pytest.raises(ValueError, match="command line: taus must be a list of numbers"):
        resolve_config(None, {"loss": "balpoe", "taus": "0,1,2"})
    with pytest.raises(ValueError, match=r"loss sade takes no hyperparameters \['taus'\]"):
        resolve_config(None, {"loss": "sade", "taus": [1.0]})
    for bad in (-1, 5, 1.5, True, "2"):
        with pytest.raises(ValueError, match="expert_stages"):
            resolve_config(None, {"loss": "sade", "expert_stages": bad})
        with pytest.raises(ValueError, match=r"expert_stages \(the last backbone stages each expert owns\) must be "
                                             r"an integer from 0 to 4"):
            build_loss("balpoe", [0.5, 0.5], expert_stages=bad)


# ---------- test-time aggregation (SADE, Sec. 4.2) ----------

def _sade_reference(a, b, epochs, batch_size, seed):
    """SADE's test_training loop, transcribed (three experts written out, its CosineSimilarity, Nesterov SGD at its
    settings, its stopping rule), on the batches ``learn_expert_weights`` visits."""
    import torch.nn.functional as F

    theta = torch.nn.Parameter(torch.full((3,), 1 / 3, dtype=torch.float64))
    optimizer = torch.optim.SGD([theta], lr=0.025, momentum=0.9, weight_decay=5e-4, nesterov=True)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    for epoch in range(epochs):
        order = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(0, len(a), batch_size):
            rows = order[i:i + batch_size]
            w = F.softmax(theta, dim=0)
            out0 = w[0] * a[rows, 0] + w[1] * a[rows, 1] + w[2] * a[rows, 2]
            out1 = w[0] * b[rows, 0] + w[1] * b[rows, 1] + w[2] * b[rows, 2]
            loss = -cos(F.softmax(out0, dim=1), F.softmax(out1, dim=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        w = F.softmax(theta.detach(), dim=0)
        if (w < 0.05).any():
            break
    return w, epoch + 1


def test_learned_aggregation_weights_are_sades_loop():
    from lade_core.math.aggregation import learn_expert_weights

    g = torch.Generator().manual_seed(3)
    a = torch.randn(150, 3, 6, generator=g, dtype=torch.float64) * 3
    b = a + torch.randn(150, 3, 6, generator=g, dtype=torch.float64) * torch.tensor([0.2, 1.0, 3.0])[None, :, None]
    w, info = learn_expert_weights(a, b, epochs=3, batch_size=40, seed=7)
    want, passes = _sade_reference(a, b, 3, 40, 7)
    torch.testing.assert_close(w, want, rtol=0, atol=1e-12)
    assert info["epochs"] == passes and info["weights"] == w.tolist()
    assert info["stability"]["after"] > info["stability"]["before"]


def test_aggregation_gives_the_weight_to_the_expert_that_is_stable_and_right_on_the_target():
    """Experts of known skill on a constructed target: expert 2 is right on both views of every image; experts 1 and
    3 name a random class per view. The learned weights go to expert 2, and its aggregate beats the uniform one."""
    from lade_core.math.aggregation import aggregate, learn_expert_weights

    g = torch.Generator().manual_seed(0)
    n, C = 1000, 5
    y = torch.randint(0, C, (n,), generator=g)

    def view():
        z = torch.randn(n, 3, C, generator=g) * 0.3
        z[torch.arange(n), 1, y] += 4.0  # the skilled expert
        for e in (0, 2):
            z[torch.arange(n), e, torch.randint(0, C, (n,), generator=g)] += 4.0
        return z

    a, b = view(), view()
    w, info = learn_expert_weights(a, b, epochs=20)
    assert int(w.argmax()) == 1 and float(w[1]) > 0.6, info
    clean = view()
    top1 = lambda weights: float((aggregate(clean, weights).argmax(1) == y).float().mean())  # noqa: E731
    assert top1(w) > top1(torch.full((3,), 1 / 3)) + 0.1


def test_aggregation_without_images_or_with_mismatched_views_is_one_clear_error():
    from lade_core.math.aggregation import learn_expert_weights

    with pytest.raises(ValueError, match="needs unlabeled target images: got none"):
        learn_expert_weights(torch.zeros(0, 3, 4), torch.zeros(0, 3, 4))
    with pytest.raises(ValueError, match=r"two views of the same images, got \(5, 3, 4\) and \(4, 3, 4\)"):
        learn_expert_weights(torch.zeros(5, 3, 4), torch.zeros(4, 3, 4))
    with pytest.raises(ValueError, match="not all finite"):
        learn_expert_weights(torch.full((2, 3, 4), float("nan")), torch.zeros(2, 3, 4))


def _skilled_views(n_per_class: int = 200, C: int = 4, seed: int = 0):
    """Expert views [N, 3, 2, C] where expert 0 is right, on every view, on classes 0..1 and names a random class on
    2..3, and expert 1 the other way round; labels grouped by class, as real splits are."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(n_per_class)
    n = len(y)
    views = torch.randn(n, 3, 2, C, generator=g) * 0.3
    for e, classes in ((0, (0, 1)), (1, (2, 3))):
        skilled = torch.isin(y, torch.tensor(classes))
        for v in range(3):
            cls = torch.where(skilled, y, torch.randint(0, C, (n,), generator=g))
            views[torch.arange(n), v, e, cls] += 4.0
    return views, y


def test_aggregated_rows_learn_each_targets_weights_from_its_own_views():
    """A head-only target gives the weight to the head expert and a tail-only one to the tail expert; each row is
    the top-1 of sum_e w_e z_e + eval_offset on the target's clean logits, w learned on its rows' views alone."""
    from lade_core.math.aggregation import aggregate, learn_expert_weights
    from lade_core.math.evaluation import Target, aggregated_rows

    views, y = _skilled_views()
    offset = torch.tensor([0.0, 0.1, -0.1, 0.2])
    counts = [300, 150, 40, 10]
    ps = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    head = Target("head", np.flatnonzero(y.numpy() < 2), torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    tail = Target("tail", np.flatnonzero(y.numpy() >= 2), torch.tensor([0, 0, 0.5, 0.5], dtype=torch.float64))
    rows = aggregated_rows(views, offset, y, ps, counts, [head, tail])
    assert [r["mode"] for r in rows] == ["aggregate", "aggregate"]
    assert rows[0]["weights"][0] > 0.6 and rows[1]["weights"][1] > 0.6, rows
    for t, row in zip((head, tail), rows):
        idx = torch.as_tensor(t.indices)
        w, _ = learn_expert_weights(views[idx, 1].double(), views[idx, 2].double())
        z = aggregate(views[idx, 0].double(), w) + offset.double()
        assert row["weights"] == pytest.approx(w.tolist())
        assert row["top1"] == pytest.approx(float((z.argmax(1) == y[idx]).double().mean()))
        assert row["n"] == len(idx) and row["top1"] > 0.95  # the right expert on each target
    fixed = float((aggregate(views[:, 0], torch.full((2,), 0.5)).argmax(1) == y).float().mean())
    assert fixed < 0.9  # the 1/E average alone is not that good: the learned weights are what helps


def test_expert_views_round_trip_and_a_plain_logits_file_is_refused(tmp_path):
    from lade_core.tracking.artifacts import (
        ExpertViews,
        read_expert_views_parquet,
        write_expert_views_parquet,
        write_logits_parquet,
    )

    views, y = _skilled_views(n_per_class=3)
    v = ExpertViews(views, y, torch.tensor([0.0, 0.5, -1.0, 2.0]))
    write_expert_views_parquet(tmp_path / "v.parquet", v)
    back = read_expert_views_parquet(tmp_path / "v.parquet")
    assert torch.equal(back.logits, views) and torch.equal(back.labels, y)
    assert torch.equal(back.eval_offset, v.eval_offset)
    write_logits_parquet(tmp_path / "plain.parquet", views[:, 0, 0], y)
    with pytest.raises(ValueError, match="plain.parquet is not an expert-views file"):
        read_expert_views_parquet(tmp_path / "plain.parquet")


def test_aggregation_rows_of_a_run_without_expert_views_is_one_clear_error():
    from lade_core.report.protocol import rule_rows
    from lade_core.tracking.artifacts import RunLogits

    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(5)
    run = RunLogits("abcdef123", "r-lade", "lade", torch.randn(20, 4, generator=g), y,
                    torch.full((4,), 0.25, dtype=torch.float64), [5, 5, 5, 5])
    with pytest.raises(ValueError, match="r-lade.*test-time aggregation needs the run's expert views.*loss lade"):
        rule_rows(run, aggregate_experts=True)
