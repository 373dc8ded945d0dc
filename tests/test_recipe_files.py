"""The recipes: a base per dataset and a file per method, composed (no copies); every recipe resolves as it did when
each was a file of its own; lade's recipes and search spaces travel with the installed package."""
import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO
from lade_core.config.recipes import RECIPES, composed_recipe, recipe_names, recipe_paths, resolve_config

# Every recipe as resolved at e68b5aa, when configs/ held 36 files (25 of them byte-identical copies).
BEFORE = json.loads((REPO / "tests" / "fixtures" / "recipes_e68b5aa.json").read_text())


# Methods added since: one file each under methods/, composed with every dataset's base.
LATER_METHODS = ("sade", "balpoe")
# Recipes added since as files of a dataset's own: LIFT's fine-tuning of CLIP with LADE.
LATER_RECIPES = ("imagenet_lt/lift", "places_lt/lift")
# Config keys added since, with the default every recipe takes.
LATER_KEYS = {"decode": "auto", "peft": "none", "peft_rank": None, "pretrained_file": None, "text_init": False,
              "reduced_decode": False}


def _as_before(resolved: dict) -> dict:
    assert {k: resolved[k] for k in LATER_KEYS} == LATER_KEYS
    return {k: v for k, v in resolved.items() if k not in LATER_KEYS}


def test_every_recipe_resolves_as_it_did_when_each_was_a_file():
    datasets = sorted(p.parent.name for p in RECIPES.glob("*/_base.yaml"))
    assert recipe_names() == sorted([*BEFORE, *(f"{d}/{m}" for d in datasets for m in LATER_METHODS),
                                     *LATER_RECIPES])
    for name in BEFORE:
        assert _as_before(resolve_config(REPO / "configs" / f"{name}.yaml", {})) == BEFORE[name], name  # checkout path
        assert _as_before(resolve_config(name, {})) == BEFORE[name], name  # lade's recipe by name


def test_no_recipe_file_is_a_copy_of_another():
    files = sorted(RECIPES.rglob("*.yaml"))
    digests = {}
    for f in files:
        digests.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), []).append(f.relative_to(RECIPES))
    assert [group for group in digests.values() if len(group) > 1] == []
    assert len(files) < len(BEFORE)  # fewer files than recipes: the composed ones are no files


def test_a_recipe_without_its_own_file_is_the_dataset_base_under_the_method(tmp_path):
    (tmp_path / "methods").mkdir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "methods" / "focal.yaml").write_text("loss: focal\ngamma: 1.5\nepochs: 3\n")
    (tmp_path / "mine" / "_base.yaml").write_text("dataset: data/mine\nepochs: 7\nlr: 0.3\n")
    (tmp_path / "mine" / "lade.yaml").write_text("base: [_base.yaml, ../methods/lade.yaml]\nalpha: 0.2\n")
    (tmp_path / "methods" / "lade.yaml").write_text("loss: lade\nalpha: 0.9\nlam: 0.4\n")
    assert composed_recipe(tmp_path / "mine" / "focal.yaml") == [tmp_path / "mine" / "_base.yaml",
                                                                  tmp_path / "methods" / "focal.yaml"]
    focal = resolve_config(tmp_path / "mine" / "focal.yaml", {})
    assert (focal["dataset"], focal["loss"], focal["gamma"], focal["lr"]) == ("data/mine", "focal", 1.5, 0.3)
    assert focal["epochs"] == 3  # the method file comes after the dataset's base
    lade = resolve_config(tmp_path / "mine" / "lade.yaml", {})  # a dataset's own file: bases left to right, then it
    assert (lade["loss"], lade["alpha"], lade["lam"], lade["epochs"]) == ("lade", 0.2, 0.4, 7)
    assert composed_recipe(tmp_path / "mine" / "lade.yaml") is None  # a file of its own is read, not composed
    assert sorted(p.name for p in recipe_paths(tmp_path)) == ["focal.yaml", "lade.yaml"]
    with pytest.raises(FileNotFoundError, match=r"this directory's recipes: .*\['focal', 'lade'\]"):
        resolve_config(tmp_path / "mine" / "softmax.yaml", {})
    (tmp_path / "mine" / "bad.yaml").write_text("base: [_base.yaml, 3]\n")
    with pytest.raises(ValueError, match="bad.yaml: base must be a file name or a list of file names, got"):
        resolve_config(tmp_path / "mine" / "bad.yaml", {})


def test_an_unknown_recipe_name_lists_lades_recipes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lade's recipes: \[.*'cifar100_lt/causal_norm'"):
        resolve_config("cifar100_lt/no_such_method", {})


@pytest.mark.slow  # builds the wheel
def test_recipes_and_search_spaces_work_from_the_installed_package_outside_a_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("lade-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json, lade_core\n"
             "from lade_core.tune import spaces as tune_spaces\n"
             "from lade_core.config.recipes import resolve_config\n"
             "space, defaults = tune_spaces.load_family('cifar100_lt')\n"
             "print(json.dumps([lade_core.__file__, resolve_config('imagenet_lt/focal', {}),\n"
             "                  resolve_config(defaults['config'], {})]))\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + probe],
                         cwd=work, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, focal, cifar_lade = json.loads(out.stdout)
    assert where.startswith(str(site))  # the wheel's lade, not the checkout's
    assert _as_before(focal) == BEFORE["imagenet_lt/focal"] and _as_before(cifar_lade) == BEFORE["cifar100_lt/lade"]
