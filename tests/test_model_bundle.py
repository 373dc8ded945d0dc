"""The logged model is self-contained for MLflow's own serving: it loads and answers in a fresh interpreter where lade
is not installed (its bundled lade_core), its requirements pin what the serving path imports, and lade's own loader
still never runs the bundled code. No Ray: a real sqlite MLflow store."""
import json
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions, version
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import log_small_model
from lade_core import __version__
from lade_core.tracking.model import SERVING_DISTRIBUTIONS, load_classifier

pytestmark = pytest.mark.slow  # fresh interpreters importing torch and MLflow: ~30 s


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    uri, info = log_small_model(tmp_path_factory.mktemp("bundle"), "bundle", lade_version=__version__,
                                rules=["inject", "raw"])
    client = mlflow.MlflowClient(uri)
    return uri, info.model_uri, Path(client.get_logged_model(info.model_id).artifact_location)


# A fresh interpreter without lade: no site hooks (so no editable-install finder, no .pth), the environment's
# packages on the path by hand, and a working directory outside the checkout.
PROBE = """
import json, sys
sys.path[:0] = {paths!r}
try:
    import lade_core
except ImportError:
    pass
else:
    raise SystemExit("lade_core is importable before the model is loaded")
import mlflow, numpy as np
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model({model_uri!r})
x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
out = model.predict(x, params={{"output": "probabilities", "target_prior": [0.2, 0.3, 0.5]}})
import lade_core
print(json.dumps({{"lade_core": lade_core.__file__,
                  "probabilities": [list(map(float, r)) for r in out["probabilities"]]}}))
"""


def test_requirements_pin_the_distributions_that_trained_it(logged):
    _, _, model_dir = logged
    pins = dict(line.split("==") for line in (model_dir / "requirements.txt").read_text().split() if "==" in line)
    for name in SERVING_DISTRIBUTIONS:
        assert pins.get(name) == version(name).split("+")[0], name
    assert json.loads((model_dir / "artifacts" / "lade_model.json").read_text())["lade_version"] == __version__


def _installed_by(requirements: list[str]) -> set[str]:
    """The distributions pip installs for ``requirements``: them and their dependencies, transitively (extras and
    markers as this machine evaluates them)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            deps = requires(req.name) or []
        except PackageNotFoundError:
            continue
        for dep in map(Requirement, deps):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return seen


def test_the_model_loads_and_answers_where_lade_is_not_installed(logged, tmp_path):
    """In the fresh interpreter the model loads its bundled lade_core and gives lade's loader's probabilities; every
    third-party module that loading and answering brought in, beyond what MLflow's store and download had already
    imported, comes from a distribution its requirements.txt installs."""
    uri, model_uri, model_dir = logged
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    seen = "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    probe = PROBE.format(paths=paths, uri=uri, model_uri=model_uri).replace(
        "model = mlflow.pyfunc.load_model(", f"mlflow.artifacts.download_artifacts(artifact_uri={model_uri!r})\n"
        f"{seen}model = mlflow.pyfunc.load_model(") + seen
    work = tmp_path / "elsewhere"
    work.mkdir()
    p = subprocess.run([sys.executable, "-S", "-c", probe], cwd=work, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    got = json.loads(lines[-2])
    assert Path(got["lade_core"]).resolve().is_relative_to(model_dir.resolve() / "code")  # the bundled copy
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    expected = load_classifier(model_uri).predict(None, x, {"output": "probabilities",
                                                            "target_prior": [0.2, 0.3, 0.5]})
    np.testing.assert_allclose(np.array(got["probabilities"]), np.stack(expected["probabilities"]), rtol=1e-5,
                               atol=1e-6)
    before, after = json.loads(lines[-3]), json.loads(lines[-1])
    added = sorted(set(after) - set(before) - {"lade_core"})
    assert {"torchvision", "torch"} <= set(added)  # the probe saw the serving path
    dists = packages_distributions()
    installed = _installed_by((model_dir / "requirements.txt").read_text().split())
    missing = {m: dists[m] for m in added if m in dists
               and not any(d.lower().replace("_", "-") in installed for d in dists[m])}
    assert missing == {}


def test_lades_loader_never_runs_the_bundled_code(logged, tmp_path):
    _, model_uri, model_dir = logged
    marker = tmp_path / "marker"
    bundled = model_dir / "code" / "lade_core" / "tracking" / "model.py"
    original = bundled.read_text()
    bundled.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + original)
    try:
        load_classifier(model_uri)
        assert not marker.exists()
    finally:
        bundled.write_text(original)  # the module's other tests share this model
