"""Artifacts written by an older lade keep working: a model logged by lade at commit e17600a (before the loss
declarations, the rule registry, the checkpoint module and the math tier; committed as MLflow wrote it, with the
logits that lade computed for a fixed input) loads with lade's own loader and with MLflow's generic one, and gives
the same logits; a Tune scheduler pickled before EpochASHA knew its storage still judges results."""
from __future__ import annotations

import json
import pickle
import shutil
from types import SimpleNamespace

import mlflow
import numpy as np
import torch

from conftest import REPO
from lade_core.data.transforms import normalize
from lade_core.tracking.model import load_classifier

OLD_MODEL = REPO / "tests" / "fixtures" / "model_e17600a"


def _input() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))


def test_a_model_logged_by_an_older_lade_loads_and_predicts_the_same(tmp_path):
    expected = json.loads((OLD_MODEL / "expected.json").read_text())
    model_dir = tmp_path / "model"
    shutil.copytree(OLD_MODEL, model_dir)
    clf = load_classifier(str(model_dir))  # lade's loader: the card and the weights, no stored code run
    assert clf.card.rules is None and clf.card.posthoc == "pc"  # a card from before the rules were recorded
    assert torch.allclose(clf.logits(_input()).double(), torch.tensor(expected["logits"], dtype=torch.float64),
                          rtol=1e-5, atol=1e-4)
    # MLflow's generic loader runs the stored entry file, which imports today's lade_core.tracking.model.
    model = mlflow.pyfunc.load_model(str(model_dir))
    x = normalize(_input(), clf.card.normalization).float()  # the card's statistics: what the model was fed
    out = model.predict(x.numpy(), params={"target_prior": expected["target_prior"], "output": "logits"})
    z = torch.tensor(np.stack(out["logits"]), dtype=torch.float64)
    pt, ps = (torch.tensor(v, dtype=torch.float64) for v in (expected["target_prior"], [0.6, 0.3, 0.1]))
    ref = torch.tensor(expected["logits"], dtype=torch.float64) - ps.log() + pt.log()  # PC (Eq. 4), written here
    assert torch.allclose(z, ref, rtol=1e-4, atol=1e-3), (z, ref)


def test_a_scheduler_pickled_before_it_knew_its_storage_still_judges_results(tmp_path):
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from lade_core.tune.trials import EpochASHA

    s = EpochASHA(max_t=3, grace_period=1, reduction_factor=2, mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}",
                  experiment="exp", search="s", storage=str(tmp_path))
    s.set_search_properties("val/top1", "max")
    del s._storage  # what Tune's tuner.pkl holds for a search started by an older lade
    s = pickle.loads(pickle.dumps(s))
    trial = SimpleNamespace(trial_id="a")
    s.on_trial_add(None, trial)
    result = {"epoch": 1, "val/top1": 0.5, CHECKPOINT_PATH_KEY: str(tmp_path / "x")}
    assert s.on_trial_result(None, trial, result) == "CONTINUE"


def test_a_scheduler_pickled_under_the_old_module_path_loads_and_judges_results(tmp_path):
    """``epoch_asha_fb80960.pkl``: an EpochASHA pickled by lade at fb80960, when it lived in ``lade_core.tuning`` (the
    name a search's tuner.pkl holds), with no storage, as an older search's. It unpickles as today's class."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from lade_core.tune.trials import EpochASHA

    data = (REPO / "tests" / "fixtures" / "epoch_asha_fb80960.pkl").read_bytes()
    assert b"lade_core.tuning" in data and b"lade_core.tune" not in data
    s = pickle.loads(data)
    assert type(s) is EpochASHA
    s._runs = (f"sqlite:///{tmp_path / 'm.db'}", *s._runs[1:])  # its MLflow store, here (the pickle's is a placeholder)
    trial = SimpleNamespace(trial_id="a")
    s.on_trial_add(None, trial)
    result = {"epoch": 1, "val/top1": 0.5, CHECKPOINT_PATH_KEY: str(tmp_path / "x")}
    assert s.on_trial_result(None, trial, result) == "CONTINUE"
