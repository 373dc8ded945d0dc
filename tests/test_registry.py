"""One registration style: everything lade looks up by name is a ``lade_core.registry.Registry``, which refuses to
replace an entry silently and answers an unknown name with its close matches and the choices."""
from __future__ import annotations

import pytest

from lade_core.data.augment import PRESETS
from lade_core.math.heads import HEADS, build_head
from lade_core.math.label_shift import LABEL_FREE, METHODS, estimate_target_prior
from lade_core.math.posthoc import RULES
from lade_core.methods import LOSSES, build_loss
from lade_core.models.backbones import MODELS
from lade_core.registry import Registry
from lade_core.tune import spaces
from lade_core.tune.trials import OBJECTIVES

REGISTRIES = {"loss": LOSSES, "post-hoc rule": RULES, "classifier head": HEADS, "model": MODELS,
              "transform": PRESETS, "search space": spaces.SPACES, "prior estimation method": METHODS,
              "label-free prior estimation method": LABEL_FREE, "objective": OBJECTIVES}


def test_every_named_thing_is_a_registry_of_its_kind():
    for kind, registry in REGISTRIES.items():
        assert isinstance(registry, Registry) and registry.kind == kind, kind
        assert len(registry) >= 2 or kind == "model", kind  # model: lade's own resnet32 beside torchvision/timm


def test_register_adds_by_call_or_decorator_and_never_replaces_silently():
    colours = Registry("colour", {"red": 1})
    assert colours.register("green", 2) == 2

    @colours.register("blue")
    def blue():
        return 3

    assert colours["blue"] is blue and list(colours) == ["red", "green", "blue"]
    with pytest.raises(ValueError, match="colour 'red' is registered already"):
        colours.register("red", 4)
    assert colours.register("red", 4, replace=True) == 4 and colours["red"] == 4
    with pytest.raises(ValueError, match="a colour needs a non-empty name"):
        colours.register("", 5)


def test_an_unknown_name_is_one_error_with_its_close_match_and_the_choices():
    colours = Registry("colour", {"red": 1, "green": 2, "grey": 3})
    with pytest.raises(ValueError) as e:
        colours.lookup("gren")
    assert str(e.value) == "unknown colour 'gren'; did you mean one of ['green', 'grey']?; choose one of " \
                           "['green', 'grey', 'red']"
    with pytest.raises(ValueError, match=r"^unknown colour 'red'; choose one of \['green'\]$"):
        colours.lookup("red", among=["green"])  # registered, but not among the allowed ones
    with pytest.raises(ValueError, match=r"unknown colour \['red'\]"):
        colours.lookup(["red"])  # not a name at all


def test_lades_lookups_go_through_their_registries():
    import torch

    with pytest.raises(ValueError, match=r"unknown loss 'balanced_sofmax'; did you mean 'balanced_softmax'\?"):
        build_loss("balanced_sofmax", [0.5, 0.5])
    with pytest.raises(ValueError, match=r"unknown classifier head 'cosin'; did you mean 'cosine'\?"):
        build_head("cosin", 4, 2)
    with pytest.raises(ValueError, match=r"unknown prior estimation method 'mapl'; did you mean 'mapls'\?"):
        estimate_target_prior(torch.zeros(4, 2), [0.5, 0.5], loss="softmax", method="mapl")
    with pytest.raises(ValueError, match=r"unknown search space 'cifar100'; did you mean 'cifar100_lt'\?"):
        spaces.load_family("cifar100")
