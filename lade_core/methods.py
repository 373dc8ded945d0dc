"""The one declaration of lade's methods: which losses exist, which hyperparameters each takes (``Hyperparameter``:
the paper's default, type, range, help, Tune range) and which post-hoc rules fit its logits (``LossSpec``), in the
registry ``LOSSES``. Config, CLI, trainer, evaluation, Tune and the method table of docs/training.md all read it, and
``build_loss`` builds from it. Installed packages add losses through the entry point group ``lade.losses``
(``register_loss``), loaded when this module is first imported.

The losses' math is ``lade_core.math.losses``; the post-hoc rules' math is ``lade_core.math.posthoc``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from lade_core.math.losses import (
    ESTIMATORS,
    MAX_EXPERT_STAGES,
    BalancedSoftmaxLoss,
    BalPoELoss,
    CausalNormLoss,
    FocalLoss,
    LADELoss,
    LDAMDRWLoss,
    LogitAdjustedLoss,
    Loss,
    PriorLike,
    SADELoss,
    SoftmaxLoss,
)
from lade_core.math.posthoc import FIXED_RULES, RULES
from lade_core.registry import Registry

__all__ = ["LOSSES", "LossSpec", "Hyperparameter", "register_loss", "build_loss", "posthoc_rules",
           "default_rule", "logits_entangled", "tuned_rules", "classifier_head", "BUILTIN_LOSSES", "CORE_LOSSES",
           "LOSS_KEYS", "PLUGIN_ERRORS"]


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of one loss, declared once: config validation (type and range), the ``train.py`` flag
    (``--<name>``, dashes for underscores), Tune's default range for a search over the loss and the method table of
    docs/training.md all read it. A name means one thing within its loss: logit adjustment's ``tau`` and Causal
    Norm's are two declarations with their own ranges.

    ``type``: ``float``, ``int``, ``str`` or ``list[float]``; ``ge``/``gt``/``le``/``lt``/``choices`` bound the value
    (each element of a list). ``space``: Tune's range, ``("uniform" | "loguniform", low, high)`` or
    ``("choice", [values])``, None to keep the default in a search. ``epoch_fraction``: the value is an epoch number
    (it must fall inside the run) and a run that leaves it unset gets this fraction of its epochs."""

    name: str
    default: object
    help: str
    type: object = float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    space: tuple | None = None
    epoch_fraction: float | None = None

    @property
    def checks(self) -> dict:
        """The bounds as ``lade_core.config.schema`` checks a value: {"ge": 0, ...}."""
        return {k: v for k in ("ge", "gt", "le", "lt", "choices") if (v := getattr(self, k)) is not None}

    @property
    def range_text(self) -> str:
        """The bounds in words, e.g. ``>= 0, < 1`` (for help texts and docs/training.md)."""
        if self.choices is not None:
            return " | ".join(map(str, self.choices))
        words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return ", ".join(f"{words[k]} {v:g}" for k, v in self.checks.items()) or "any"


@dataclass(frozen=True)
class LossSpec:
    """One training loss, declared once: its module, its hyperparameters (``params``, with the paper's defaults:
    keyword names of the class), the post-hoc rules that fit its (inference) logits, the one the loss calls for
    first (validation, summaries). The classifier head it trains is the module's ``head``. A package adds one with
    an entry point in the group ``lade.losses`` whose object is a ``LossSpec`` (``register_loss``)."""

    cls: type[nn.Module]
    params: tuple[Hyperparameter, ...]
    posthoc: tuple[str, ...]
    needs_counts: bool = False  # the loss takes the training class counts, not only their proportions
    # Why the loss cannot train on mixed (soft) targets (``mixing``: mixup / cutmix), None if it can: its
    # per-sample value must be linear in the one-hot target, sum_c t_c * l_c(z).
    hard_targets_only: str | None = None

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.params)

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.params}

    @property
    def epoch_keys(self) -> dict[str, float]:
        """The hyperparameters that are epoch numbers, each with the fraction of the run it defaults to."""
        return {h.name: h.epoch_fraction for h in self.params if h.epoch_fraction is not None}

    def param(self, name: str) -> Hyperparameter:
        return next(h for h in self.params if h.name == name)


_H = Hyperparameter
# The multi-expert losses' model layout (SADE's and BalPoE's released ResNets: layer1 shared, the last two stages
# each expert's own, ``models.CifarResNet.split_experts``); 0 shares the whole backbone.
_EXPERT_STAGES = _H("expert_stages", 2, "last backbone stages each expert owns (SADE, BalPoE: 2; 0: the whole "
                    "backbone shared, each expert its own classifier)", type=int, ge=0, le=MAX_EXPERT_STAGES)
# A plain-softmax (or focal) model's logits are entangled with p_s and need PC compensation (Eq. 4); the logits of
# LADE / Balanced Softmax, of a logit-adjusted model (its head's inference offset), of LDAM-DRW (re-weighted towards
# balance) and of Causal Norm (TDE; the paper's "PC Causal Norm" adds log p_t - log p_u) are disentangled and
# take p_t by injection (Eq. 17). "raw" is the logits as they are. A ``space`` brackets its paper's value.
LOSSES: Registry[LossSpec] = Registry("loss", {
    "softmax": LossSpec(SoftmaxLoss, (), ("pc", "raw")),
    "balanced_softmax": LossSpec(BalancedSoftmaxLoss, (), ("inject", "raw")),
    "lade": LossSpec(LADELoss, (
        _H("alpha", 0.1, "LADER weight α (Eq. 20)", ge=0),
        _H("lam", 0.1, "LADER regularizer λ (Eq. 16)", ge=0),
        _H("class_weights", None, "LADER class weights α_c as a list (unset: p_s)", type=list[float], ge=0),
        _H("class_weight_power", None, "α_c ∝ p_s(c)^power (1: the paper's p_s, 0: uniform)", ge=0, le=1),
        _H("estimator", "released", "LADER's estimator of the class-c mean of e^z", type=str, choices=ESTIMATORS),
    ), ("inject", "raw"),
        hard_targets_only="LADER (Eq. 15-16) averages each class's logits over the samples of that class in the "
                          "batch, which a mixed image does not belong to"),
    "logit_adjusted": LossSpec(LogitAdjustedLoss, (
        _H("tau", 1.0, "adjustment strength τ (Menon et al.: 1)", ge=0, space=("uniform", 0.5, 2.0)),
    ), ("inject", "raw")),
    "focal": LossSpec(FocalLoss, (
        _H("gamma", 2.0, "focusing γ (Lin et al.: 2)", ge=0, space=("uniform", 0.0, 3.0)),
    ), ("pc", "raw")),
    "ldam_drw": LossSpec(LDAMDRWLoss, (
        _H("max_margin", 0.5, "largest class margin", gt=0, space=("uniform", 0.1, 1.0)),
        _H("scale", 30.0, "cosine logit scale s", gt=0, space=("loguniform", 5.0, 50.0)),
        _H("drw_epoch", 160, "epoch re-weighting starts (unset: 80 % of the run)", type=int, ge=0,
           epoch_fraction=0.8),
        _H("beta", 0.9999, "class-balanced weights' β", ge=0, lt=1),
    ), ("inject", "raw"), needs_counts=True,
        hard_targets_only="LDAM subtracts the label's margin inside the softmax, so the loss is not linear in the "
                          "target"),
    "causal_norm": LossSpec(CausalNormLoss, (
        _H("tau", 16.0, "logit scale τ", gt=0),
        _H("gamma", 1 / 32, "weight-norm offset γ", ge=0),
        _H("heads", 2, "number of heads K", type=int, ge=1),
        _H("alpha", 1.5, "TDE strength α", ge=0, space=("uniform", 0.0, 3.0)),
    ), ("inject", "raw")),
    "sade": LossSpec(SADELoss, (
        _H("tau", 2.0, "inverse expert's strength τ (Zhang et al.: 2)", ge=0, space=("uniform", 1.0, 3.0)),
        _EXPERT_STAGES,
    ), ("inject", "raw")),
    "balpoe": LossSpec(BalPoELoss, (
        _H("taus", [0.0, 1.0, 2.0], "one logit-adjustment strength τ_k per expert (Sanchez Aimar et al.: 0, 1, 2)",
           type=list[float]),
        _EXPERT_STAGES,
    ), ("inject", "raw")),
})
BUILTIN_LOSSES: tuple[str, ...] = tuple(LOSSES)
# The losses whose hyperparameter names every config carries (None where unset): those of lade's first runs. A loss
# added since, built in or a plugin, adds its new names only to its own configs, so the config, the digest and the
# recipe of every other loss stay what they were (a run started before still resumes).
CORE_LOSSES: tuple[str, ...] = ("softmax", "balanced_softmax", "lade", "logit_adjusted", "focal", "ldam_drw",
                                "causal_norm")
# Entry points of the group ``lade.losses`` that could not be loaded: name -> why (named by ``unknown loss``).
PLUGIN_ERRORS: dict[str, str] = {}


def register_loss(name: str, spec: LossSpec) -> LossSpec:
    """Add loss ``name`` to ``LOSSES`` (what an entry point of the group ``lade.losses`` does); a malformed
    declaration is refused with the reason."""
    import inspect

    if not name.isidentifier() or name in LOSSES:
        raise ValueError(f"loss name {name!r} must be a Python identifier not yet registered "
                         f"(registered: {sorted(LOSSES)})")
    if not isinstance(spec, LossSpec):
        raise TypeError(f"loss {name!r}: an entry point must name a lade_core.methods.LossSpec, got "
                        f"{type(spec).__name__}")
    if not spec.posthoc or any(r not in FIXED_RULES for r in spec.posthoc):
        raise ValueError(f"loss {name!r}: posthoc must name rules among {FIXED_RULES}, got {spec.posthoc!r}")
    takes = set(inspect.signature(spec.cls).parameters)
    missing = [h.name for h in spec.params if h.name not in takes]
    if "source_prior" not in takes or missing:
        raise ValueError(f"loss {name!r}: {spec.cls.__name__}(source_prior, ...) must take its hyperparameters as "
                         f"keywords; missing {missing or ['source_prior']}")
    return LOSSES.register(name, spec)


def _load_plugins() -> None:
    """Register the losses that installed packages declare (entry point group ``lade.losses``). One that fails to
    load is left out with its reason in ``PLUGIN_ERRORS`` (named when the loss is asked for), not fatal to lade."""
    import warnings
    from importlib.metadata import entry_points

    for ep in entry_points(group="lade.losses"):
        try:  # a name already registered (a built-in's) is refused by register_loss, with the reason
            register_loss(ep.name, ep.load())
        except Exception as e:  # noqa: BLE001 - any failure of a third-party package: reported, not raised
            PLUGIN_ERRORS[ep.name] = f"entry point {ep.value!r} failed: {type(e).__name__}: {e}"
            warnings.warn(f"lade: loss plugin {ep.name!r} not loaded: {PLUGIN_ERRORS[ep.name]}", stacklevel=2)


_load_plugins()
# Every hyperparameter name any loss takes (config keys): a name means one thing within its loss.
LOSS_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for spec in LOSSES.values() for k in spec.hyperparameters))


def _spec(name: str) -> LossSpec:
    return LOSSES.lookup(name, f" (plugin: {PLUGIN_ERRORS[name]})" if name in PLUGIN_ERRORS else "")


def build_loss(name: str, source_prior: PriorLike, *, train_counts: Sequence[int] | None = None,
               **hyperparameters) -> Loss:
    """The registered loss ``name`` for ``source_prior`` [C]; unknown names and hyperparameters are refused, and a
    hyperparameter not given takes the paper's default. ``train_counts`` [C] only for losses that need them."""
    spec = _spec(name)
    unknown = sorted(set(hyperparameters) - set(spec.hyperparameters))
    if unknown:
        raise ValueError(f"loss {name!r} takes no hyperparameters {unknown}; it takes {list(spec.hyperparameters)}")
    extra = {"train_counts": train_counts} if spec.needs_counts else {}
    return spec.cls(source_prior, **{**spec.defaults, **hyperparameters}, **extra)


def posthoc_rules(name: str) -> tuple[str, ...]:
    """The post-hoc rules that fit loss ``name``'s logits, the one the loss calls for first."""
    return _spec(name).posthoc


def default_rule(name: str) -> str:
    """The post-hoc rule loss ``name`` calls for (validation, summaries, the served model's default)."""
    return _spec(name).posthoc[0]


def logits_entangled(name: str) -> bool:
    """Whether loss ``name``'s logits are entangled with p_s (its own rule removes log p_s, as PC does)."""
    return RULES[default_rule(name)].removes_source_prior


def tuned_rules(name: str, has_classifier: bool) -> tuple[str, ...]:
    """The rules tuned on validation that fit loss ``name``'s logits (post-hoc logit adjustment, τ-norm, for logits
    entangled with p_s), those needing the linear classifier only when it is at hand."""
    if not logits_entangled(name):
        return ()
    return tuple(r.name for r in RULES.values() if r.tuned and (has_classifier or not r.needs_classifier))


def classifier_head(name: str, source_prior: PriorLike, *, train_counts: Sequence[int] | None = None,
                    **hyperparameters) -> tuple[str, dict]:
    """(kind, keyword arguments) of the classifier head loss ``name`` trains: ``models.build_model(..., head=)``."""
    return build_loss(name, source_prior, train_counts=train_counts, **hyperparameters).head
