"""A loss is declared once (lade_core.methods.LOSSES: class, hyperparameters with type, range, default, help and
Tune range, post-hoc rules), and config, CLI, Tune and docs/training.md derive from it; a package adds a loss through
the entry point group ``lade.losses`` (examples/label_smoothing_plugin), end to end: train, search, serve."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import REPO
from lade_core.config.recipes import resolve_config
from lade_core.math.losses import SoftmaxLoss
from lade_core.methods import BUILTIN_LOSSES, LOSSES, Hyperparameter, LossSpec, build_loss, register_loss

PLUGIN = REPO / "examples" / "label_smoothing_plugin"
PRIOR = [0.5, 0.3, 0.2]
COUNTS = [50, 30, 20]


def _build(loss: str, **hp):
    return build_loss(loss, PRIOR, train_counts=COUNTS if LOSSES[loss].needs_counts else None, **hp)


def _probes(h: Hyperparameter) -> list[tuple[object, bool]]:
    """(value, accepted?) at and just beyond each declared bound."""
    out = []
    step = 1 if h.type is int else 1e-6
    if h.ge is not None:
        out += [(h.ge, True), (h.ge - step, False)]
    if h.gt is not None:
        out += [(h.gt, False), (h.gt + step, True)]
    if h.le is not None:
        out += [(h.le, True), (h.le + step, False)]
    if h.lt is not None:
        out += [(h.lt, False), (h.lt - step, True)]
    return out


def test_each_declared_range_is_the_range_the_loss_itself_accepts():
    """The declaration is what config, CLI and Tune check; the class guards direct use. At every declared bound
    both agree, so a config value the declaration passes never fails later inside a worker."""
    probed = 0
    for name in BUILTIN_LOSSES:
        for h in LOSSES[name].params:
            if h.type not in (float, int):
                continue
            for value, ok in _probes(h):
                probed += 1
                if ok:
                    _build(name, **{h.name: value})
                    assert resolve_config(None, {"loss": name, h.name: value})[h.name] == value
                else:
                    with pytest.raises(ValueError):
                        _build(name, **{h.name: value})
                    with pytest.raises(ValueError, match=rf"command line: {h.name} must be"):
                        resolve_config(None, {"loss": name, h.name: value})
            if h.default is not None:
                _build(name, **{h.name: h.default})
    assert probed >= 20
    with pytest.raises(ValueError, match="estimator"):
        resolve_config(None, {"loss": "lade", "estimator": "nope"})


def test_a_hyperparameter_name_means_one_thing_within_its_loss():
    """``tau`` of logit adjustment (>= 0) and ``tau`` of Causal Norm (> 0) are two declarations: tau 0 is a valid
    logit adjustment (no adjustment) and one clear config error for Causal Norm, before Ray starts."""
    assert resolve_config(None, {"loss": "logit_adjusted", "tau": 0})["tau"] == 0
    with pytest.raises(ValueError, match=r"command line: tau must be > 0"):
        resolve_config(None, {"loss": "causal_norm", "tau": 0})
    with pytest.raises(ValueError, match=r"loss focal takes no hyperparameters \['alpha'\]; it takes \['gamma'\]"):
        resolve_config(None, {"loss": "focal", "alpha": 1.0})
    # A recipe's keys stay flat; the file's loss hyperparameters are dropped when the command line changes the loss.
    cfg = resolve_config(REPO / "configs" / "synthetic" / "lade.yaml", {"loss": "causal_norm", "tau": 8.0})
    assert cfg["loss"] == "causal_norm" and cfg["tau"] == 8.0 and cfg["alpha"] is None


def test_train_py_flags_come_from_the_declarations():
    import argparse

    from lade_core.config.flags import add_loss_arguments

    ap = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_loss_arguments(ap)
    flags = {a.dest: a for a in ap._actions if a.dest != "help"}
    assert set(flags) == {h.name for spec in LOSSES.values() for h in spec.params}
    assert flags["drw_epoch"].type is int and flags["tau"].type is float
    assert flags["estimator"].choices == ["released", "paper"]
    assert "logit_adjusted: adjustment strength" in flags["tau"].help
    assert "causal_norm: logit scale" in flags["tau"].help
    assert ap.parse_args(["--class-weights", "[0.5, 0.5]", "--max-margin", "0.3"]).class_weights == [0.5, 0.5]


def test_tune_ranges_of_a_method_are_its_declared_spaces():
    from lade_core.tune import spaces as tune_spaces

    assert tune_spaces.method_space("ldam_drw") == {"max_margin": ("uniform", 0.1, 1.0),
                                                    "scale": ("loguniform", 5.0, 50.0)}
    assert tune_spaces.method_space("softmax") == {}
    # A method's sub-space is bounded by that method's declaration: Causal Norm's tau must stay > 0.
    with pytest.raises(ValueError, match=r"beta range \[0.5, 1.5\] outside \[0.0, 1.0\]"):
        tune_spaces.validate_space({"loss": ("methods", {"ldam_drw": {"beta": ("uniform", 0.5, 1.5)}})}, "mine")
    with pytest.raises(ValueError, match=r"tau range \[-1.0, 2.0\] outside \[0.0, inf\]"):
        tune_spaces.validate_space({"loss": ("methods", {"causal_norm": {"tau": ("uniform", -1.0, 2.0)}})}, "mine")


def test_the_docs_method_table_lists_each_loss_with_its_declared_hyperparameters():
    text = (REPO / "docs" / "training.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|(.*)\|\s*$", text, re.M))
    for name in BUILTIN_LOSSES:
        assert name in rows, f"docs/training.md's method table has no row for loss {name}"
        named = re.findall(r"`(\w+)`", rows[name].rsplit("|", 1)[-1])
        assert named == list(LOSSES[name].hyperparameters), (name, named)
        for h in LOSSES[name].params:  # a default the table states is the declared one
            m = re.search(rf"`{h.name}` ([\d./]+)", rows[name])
            if m and isinstance(h.default, (int, float)):
                stated = eval(m.group(1), {})  # noqa: S307 - digits, dots and slashes only (the regex)
                assert math.isclose(stated, h.default), (name, h.name, m.group(1))


def test_a_malformed_declaration_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="not yet registered"):
        register_loss("lade", LOSSES["softmax"])
    with pytest.raises(ValueError, match="posthoc must name rules"):
        register_loss("mine", LossSpec(SoftmaxLoss, (), ("pc_softmax",)))
    with pytest.raises(ValueError, match=r"missing \['smoothing'\]"):
        register_loss("mine", LossSpec(SoftmaxLoss, (Hyperparameter("smoothing", 0.1, "ε"),), ("pc",)))
    with pytest.raises(TypeError, match="LossSpec"):
        register_loss("mine", {"cls": SoftmaxLoss})
    assert "mine" not in LOSSES


def _dist(root: Path, name: str, entry: str) -> None:
    """A minimal installed distribution (what pip leaves in site-packages) declaring one ``lade.losses`` entry."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"  # as pip names it: the name, a dash, the version
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lade.losses]\n{entry}\n")


def _python(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_a_plugin_that_fails_to_load_is_named_where_its_loss_is_asked_for(tmp_path):
    _dist(tmp_path, "broken-plugin", "broken = no_such_module:declaration")
    p = _python("from lade_core.methods import build_loss\nbuild_loss('broken', [0.5, 0.5])", tmp_path)
    assert p.returncode == 1
    assert "loss plugin 'broken' not loaded" in p.stderr  # the warning at import
    assert re.search(r"unknown loss 'broken' \(plugin: entry point 'no_such_module:declaration' failed: "
                     r"ModuleNotFoundError", p.stderr), p.stderr[-2000:]


def test_a_plugin_loads_whichever_path_lade_is_imported_by_first(tmp_path):
    """The plugin imports ``lade_core.methods`` (and ``lade_core.math.losses``) while lade's registry is loading it:
    that works when a program starts at the declarations, at the losses, at the config or at the training driver."""
    import shutil

    shutil.copytree(PLUGIN / "lade_label_smoothing", tmp_path / "lade_label_smoothing")
    _dist(tmp_path, "lade-label-smoothing", "label_smoothing = lade_label_smoothing:declaration")
    for first in ("import lade_core.methods", "import lade_core.math.losses", "import lade_core.config.schema",
                  "import lade_core.train.driver"):
        p = _python(f"{first}\nimport lade_core.methods as a, lade_core.methods as b\n"
                    "print(a is b, 'label_smoothing' in a.LOSSES, a.PLUGIN_ERRORS)", tmp_path)
        assert p.returncode == 0 and p.stdout.split() == ["True", "True", "{}"], (first, p.stdout, p.stderr[-2000:])


def test_a_plugin_named_like_a_built_in_loss_is_refused_with_a_warning(tmp_path):
    import shutil

    shutil.copytree(PLUGIN / "lade_label_smoothing", tmp_path / "lade_label_smoothing")
    _dist(tmp_path, "shadowing-plugin", "lade = lade_label_smoothing:declaration")
    p = _python("import lade_core.methods as l\nprint(l.LOSSES['lade'].cls.__name__)", tmp_path)
    assert p.returncode == 0 and p.stdout.split() == ["LADELoss"], p.stderr[-2000:]
    assert "loss plugin 'lade' not loaded" in p.stderr and "not yet registered" in p.stderr


def test_the_example_plugin_loss_is_label_smoothed_cross_entropy_in_value_and_gradient():
    sys.path.insert(0, str(PLUGIN))
    try:
        from lade_label_smoothing import LabelSmoothingLoss, declaration
    finally:
        sys.path.remove(str(PLUGIN))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (16,), generator=g)
    eps = 0.2
    loss = LabelSmoothingLoss([0.2] * 5, smoothing=eps)(z, y)
    # (1 - ε) CE + ε · mean over classes of -log softmax, written out (Szegedy et al. 2016, Sec. 7).
    z2 = z.detach().clone().requires_grad_(True)
    logp = z2 - torch.logsumexp(z2, dim=1, keepdim=True)
    ref = ((1 - eps) * -logp[torch.arange(16), y] + eps * -logp.mean(dim=1)).mean()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0)
    loss.backward()
    ref.backward()
    assert torch.allclose(z.grad, z2.grad, rtol=1e-10, atol=1e-14)
    assert declaration.hyperparameters == ("smoothing",) and declaration.posthoc[0] == "pc"


SERVE_BARE = """
import json, sys
import pandas as pd, pyarrow.parquet as pq
from lade_core.tracking.model import load_classifier
test = pq.read_table(sys.argv[2]).to_pandas().sort_values("index")
table = load_classifier("models:/ls-model/1", sys.argv[1]).predict(None, pd.DataFrame({"image": list(test["image"])}))
print(json.dumps(["lade_label_smoothing" in sys.modules, table["label"].tolist()]))
"""


@pytest.mark.slow
def test_an_installed_loss_plugin_trains_searches_and_serves(tmp_path):
    """pip install examples/label_smoothing_plugin, then: train.py --loss label_smoothing --smoothing 0.2 trains it
    and logs smoothing; tune.py --methods label_smoothing searches its declared range; the registered model
    predicts, even where the plugin is not installed (its card records the post-hoc rules)."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(PLUGIN)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--smoke-test", "--num-cpus", "4", "--mlflow-uri", uri]

    train = subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), *common, "--storage-path",
                            str(tmp_path / "ray_results"), "--loss", "label_smoothing", "--smoothing", "0.2",
                            "--run-name", "ls", "--register", "ls-model"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("lade").experiment_id], "attributes.run_name = 'ls'")[0]
    assert run.data.params["loss"] == "label_smoothing" and float(run.data.params["smoothing"]) == 0.2
    assert "train/ce_smoothed" in run.data.metrics and "test/top1" in run.data.metrics
    assert "post-hoc: pc" in train.stdout

    tune = subprocess.run([sys.executable, str(REPO / "pipelines" / "tune.py"), *common, "--storage-path",
                           str(tmp_path / "tune"), "--methods", "label_smoothing", "--num-samples", "2",
                           "--epochs", "1", "--max-concurrent-trials", "2", "--experiment", "ls-search"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    exp = client.get_experiment_by_name("ls-search")
    trials = client.search_runs([exp.experiment_id], "tags.`lade.search` = 'ls-search'")
    drawn = [float(t.data.params["smoothing"]) for t in trials]
    assert len(trials) == 2 and {t.data.params["loss"] for t in trials} == {"label_smoothing"}
    assert all(0.0 <= s <= 0.3 for s in drawn) and len(set(drawn)) == 2  # its declared space, drawn per trial

    # Served where the plugin is not installed: a fresh interpreter without it on its path (no Ray, no predict.py
    # job), lade's own loader reading the card and the weights, answering the prepared test images in split order.
    from lade_core.tracking.artifacts import LOGITS_ARTIFACT, PRIOR_ARTIFACT, read_logits_parquet

    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    split = tmp_path / "data" / "synthetic_smoke" / "test"
    serve = subprocess.run([sys.executable, "-c", SERVE_BARE, uri, str(split)], cwd=tmp_path, env=bare,
                           capture_output=True, text=True, timeout=300)
    assert serve.returncode == 0, serve.stderr[-3000:]
    plugin_loaded, labels = json.loads(serve.stdout.strip().splitlines()[-1])
    assert plugin_loaded is False
    logits, _ = read_logits_parquet(client.download_artifacts(run.info.run_id, LOGITS_ARTIFACT, str(tmp_path)))
    ps = json.loads(Path(client.download_artifacts(run.info.run_id, PRIOR_ARTIFACT, str(tmp_path))).read_text())
    # PC (Eq. 4) under the uniform prior, written here: argmax of z - log p_s.
    expected = (logits.double() - torch.tensor(ps["source_prior"], dtype=torch.float64).log()).argmax(1)
    assert len(labels) == len(logits) == 80
    assert (np.asarray(labels) == expected.numpy()).mean() >= 0.99  # float32 ties aside


def test_the_classes_and_heads_defaults_are_the_declared_ones():
    """A bare ``LADELoss(p_s)`` (the library API) and a head built without arguments hold the paper's defaults that
    the declarations state: the keyword defaults of the classes may not drift from ``LOSSES``."""
    import inspect

    from lade_core.math.heads import CausalNormClassifier, CosineClassifier

    for name in BUILTIN_LOSSES:
        spec = LOSSES[name]
        params = inspect.signature(spec.cls).parameters
        assert {h.name: params[h.name].default for h in spec.params} == spec.defaults, name
    heads = {"causal_norm": CausalNormClassifier, "ldam_drw": CosineClassifier}
    for name, head in heads.items():
        params = inspect.signature(head).parameters
        kind, kwargs = _build(name).head
        assert {k: params[k].default for k in kwargs} == {k: LOSSES[name].defaults[k] for k in kwargs}, name
