"""The registry and the artifact store are a trust boundary: lade's loader (``serving.load_classifier``, used by
predict.py, evaluate.py --model and every Ray actor) builds a model from its card and weights with the installed
lade and never executes what the store holds, even when someone has replaced it. No Ray: a real sqlite MLflow store."""
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lade_core.models.backbones import build_model
from lade_core.tracking.model import LadeClassifier, ModelCard, load_classifier, log_classifier

# What a tampered artifact would do if it ever ran: leave this file behind.
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture
def logged(tmp_path):
    """A lade model logged and registered by today's code into a fresh store; (client, registered URI, model dir)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("trust")
    torch.manual_seed(0)
    card = ModelCard("resnet32", 3, ["a", "b", "c"], [0.6, 0.3, 0.1], "lade", "cifar", 16)
    with mlflow.start_run():
        info = log_classifier(card, build_model("resnet32", 3).state_dict(), "model")
    client = mlflow.MlflowClient(uri)
    mlflow.register_model(info.model_uri, "trusted")
    return client, "models:/trusted/1", Path(client.get_logged_model(info.model_id).artifact_location)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_tampered_entry_file_never_runs_in_lades_loader(logged, tmp_path):
    client, model_uri, model_dir = logged
    images = pd.DataFrame({"image": [_png(10), _png(200)]})
    before = load_classifier(model_uri).predict(None, images)
    marker = tmp_path / "marker"
    entry = model_dir / "pyfunc_entry.py"
    entry.write_text(PAYLOAD.format(marker=str(marker)) + entry.read_text())

    model = load_classifier(model_uri)
    assert isinstance(model, LadeClassifier) and not marker.exists()
    pd.testing.assert_frame_equal(model.predict(None, images), before)  # built from the card and weights alone
    # The same artifact through MLflow's generic loader does run it: the tamper is live, the boundary is lade's.
    mlflow.pyfunc.load_model(model_uri)
    assert marker.read_text() == "ran"


class _Foreign(mlflow.pyfunc.PythonModel):
    """A model logged by another tool, as a pickle whose unpickling writes the marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (PAYLOAD.format(marker=self.marker),))

    def predict(self, context, model_input):
        return model_input


def test_a_foreign_pickled_model_is_refused_without_unpickling(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("foreign")
    marker = tmp_path / "marker"
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=_Foreign(str(marker)), pip_requirements=[])
    assert not marker.exists()
    with pytest.raises(ValueError,
                       match="is not a lade model: it was logged by another tool \\(a pickled python model\\)"):
        load_classifier(info.model_uri)
    assert not marker.exists()


def test_a_model_with_another_layout_or_a_bad_card_is_one_clear_error(logged):
    client, model_uri, model_dir = logged
    mlmodel = model_dir / "MLmodel"
    original = mlmodel.read_text()
    mlmodel.write_text(original.replace("pyfunc_entry.py", "other_entry.py"))
    with pytest.raises(ValueError, match="is not a lade model: its code file is 'other_entry.py'"):
        load_classifier(model_uri)
    mlmodel.write_text(original)
    card = model_dir / "artifacts" / "lade_model.json"
    card.write_text(card.read_text().replace('"format": "lade-model-card/1"', '"format": "x"'))
    with pytest.raises(ValueError, match="is not a lade model card"):
        load_classifier(model_uri)
    with pytest.raises(ValueError, match="cannot load models:/nope/1"):
        load_classifier("models:/nope/1")


def test_the_champion_alias_never_moves_to_a_model_of_other_classes(logged):
    from lade_core.tracking.model import check_alias_classes

    client, model_uri, _ = logged
    uri = client.tracking_uri
    check_alias_classes(uri, "trusted", "champion", ["x", "y"])  # unset alias: nothing to compare
    client.set_registered_model_alias("trusted", "champion", "1")
    check_alias_classes(uri, "trusted", "champion", ["a", "b", "c"])  # the same classes
    with pytest.raises(ValueError, match=r"models:/trusted@champion is version 1, a model of 3 other classes"):
        check_alias_classes(uri, "trusted", "champion", ["a", "b", "c", "d"])


KILLED_LOGGER = r'''
import sys, mlflow, torch
from lade_core.models.backbones import build_model
from lade_core.tracking.model import ModelCard, log_classifier
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run(run_id=sys.argv[2]):
    log_classifier(ModelCard("resnet32", 3, ["a", "b", "c"], [0.6, 0.3, 0.1], "lade", "cifar", 16),
                   build_model("resnet32", 3).state_dict(), "model")
'''


def test_a_driver_killed_inside_log_model_leaves_nothing_that_is_reused_or_registered(tmp_path):
    """SIGKILL while MLflow is logging the model (its LoggedModel created PENDING, files on their way): the
    rerun's lookup marks it FAILED and finds no model, so the model is logged again, and that one registers
    and loads."""
    import signal
    import subprocess
    import sys
    import time

    from mlflow.entities import LoggedModelStatus

    from lade_core.tracking.store import logged_model_uri, register_once, start_or_resume_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = start_or_resume_run(uri, "killed", "r", {"source_prior": [0.6, 0.3, 0.1], "train_counts": [6, 3, 1]})
    client = mlflow.MlflowClient(uri)
    exp = client.get_run(run_id).info.experiment_id
    child = subprocess.Popen([sys.executable, "-c", KILLED_LOGGER, uri, run_id])
    deadline = time.time() + 120
    while not client.search_logged_models([exp]):
        assert child.poll() is None and time.time() < deadline, "log_model ended before it could be killed"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    (half,) = client.search_logged_models([exp])
    assert half.status == LoggedModelStatus.PENDING  # killed inside log_model
    assert logged_model_uri(client, run_id, "model") is None
    assert client.get_logged_model(half.model_id).status == LoggedModelStatus.FAILED
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = log_classifier(ModelCard("resnet32", 3, ["a", "b", "c"], [0.6, 0.3, 0.1], "lade", "cifar", 16),
                              build_model("resnet32", 3).state_dict(), "model")
    assert logged_model_uri(client, run_id, "model") == info.model_uri
    version = register_once(client, run_id, "after-kill", logged_model_uri(client, run_id, "model"))
    assert isinstance(load_classifier(f"models:/after-kill/{version.version}"), LadeClassifier)
