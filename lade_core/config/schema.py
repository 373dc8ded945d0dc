"""Training config: typed sections, built from a recipe and CLI overrides (``lade_core.config.recipes``).

A config file is flat YAML (``lr: 0.1``, ``loss: lade``, ``schedule: {name: cosine}``); every key belongs to
exactly one section below (model, data, loss, optimizer, schedule, runtime), which gives it a type and a range.
``resolve_config`` refuses unknown keys, values of the wrong type (a boolean is not an integer, ``"abc"`` is not a
seed) or range, incomplete schedules, YAML syntax errors and ``base:`` loops, each naming the file (or the command
line) and the key, before Ray starts. What it returns is the flat, checked dict that Ray Train gets as
``train_loop_config`` (and Tune as its param space); it is saved with every checkpoint and logged to MLflow.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lade_core.data.augment import check_augment, check_normalize
from lade_core.data.prepared import DECODE_PLACES
from lade_core.data.sources import MIN_IMAGE_SIZE
from lade_core.methods import CORE_LOSSES, LOSS_KEYS, LOSSES
from lade_core.models.backbones import check_model_name
from lade_core.models.foundation import TEXT_HEAD_SCALE, Finetuning, check_peft, text_embedding_dim, text_tower_source

SCHEDULES = ("cosine", "multistep", "step", "constant")
CLI = "command line"


def _opt(default=None, **checks):
    return field(default=default, metadata=checks)


@dataclass(frozen=True)
class ModelConfig:
    # lade's resnet32, any torchvision classification model (torchvision.models.list_models()), or timm:NAME
    model: str = _opt("resnet32", check=check_model_name)
    # The library's pretrained backbone weights: torchvision's weights name (DEFAULT, IMAGENET1K_V2, ...) or, for
    # timm, DEFAULT or a pretrained tag (in1k, ...); None: random init (or weights_path).
    pretrained: str | None = _opt(None, nonempty=True)
    weights_path: str | None = _opt(None, existing_file=True)  # a local state dict to start from
    # A local copy of the library's pretrained weights (timm: its file, e.g. a Hugging Face repository's
    # open_clip_pytorch_model.bin or model.safetensors): an air-gapped machine's `pretrained`.
    pretrained_file: str | None = _opt(None, existing_file=True)
    # Fine-tuning a pretrained backbone (lade_core.models.foundation): none (all of it), adaptformer or lora
    # (adapters in a frozen ViT), linear (frozen backbone, the head only).
    peft: str = _opt("none", check=check_peft)
    peft_rank: int | None = _opt(None, ge=1)  # adaptformer's bottleneck / LoRA's rank; None: LIFT's rule / 8
    # The classifier a cosine one initialised from the CLIP text embeddings of the class names (LIFT).
    text_init: bool = False


@dataclass(frozen=True)
class DatasetConfig:
    dataset: str | None = _opt(None, nonempty=True)  # a prepared dataset directory
    synthetic: dict | None = None  # make_synthetic options: prepare `dataset` from them if it is absent
    image_size: int | None = _opt(None, ge=MIN_IMAGE_SIZE)  # crop size; None: the prepared dataset's (its manifest)


def _check_mix(value):
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"alpha"}:
        raise ValueError(f"must be {{alpha: number > 0}}, got {value!r}")
    a = value["alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {a!r}")
    return {"alpha": float(a)}


@dataclass(frozen=True)
class AugmentConfig:
    """The image pipeline (lade_core.data.augment): training augmentation, normalization, batch mixing."""

    # None: the dataset family's preset; a preset name (cifar, imagenet); or [{TransformName: {kwargs}}, ...] of
    # torchvision.transforms.v2, on uint8 images. The resolved list is what the run records.
    augment: object = _opt(None, check=check_augment)
    # None: the family's statistics; `dataset`: the training split's (prepare_data computes them); {mean, std}.
    normalize: object = _opt(None, check=check_normalize)
    mixup: object = _opt(None, check=_check_mix)  # {alpha}: Beta(alpha, alpha) mixing weights (lade_core.math.mixing)
    cutmix: object = _opt(None, check=_check_mix)  # {alpha}: CutMix box areas ~ Beta(alpha, alpha)
    # JPEGs decoded at 1/2, 1/4 or 1/8 of their size where the training RandomResizedCrop's box allows it (libjpeg's
    # DCT scaling): close to the full decode's crops, not equal (data.transforms.reduced_steps; bench/README.md).
    reduced_decode: bool = False


@dataclass(frozen=True)
class LossConfig:
    """The loss and its hyperparameters, as the loss declares them (``lade_core.methods.LOSSES``: type, range,
    default). A config stays flat (``loss: causal_norm``, ``tau: 16``): a hyperparameter key means that
    hyperparameter of the config's loss, so ``tau`` is checked against Causal Norm's range (> 0) there and logit
    adjustment's (>= 0) with ``loss: logit_adjusted``. A hyperparameter left None takes the loss's default; one the
    chosen loss does not take is an error. ``values`` holds every built-in hyperparameter key (and a plugin loss's
    own), None where unset."""

    loss: str = "lade"
    values: dict = field(default_factory=dict)

    @classmethod
    def build(cls, flat: dict, where) -> LossConfig:
        loss = _check_value("loss", flat.get("loss", cls.loss), str, {"choices": tuple(LOSSES)}, where("loss"))
        spec = LOSSES[loss]
        given = {k: flat[k] for k in LOSS_KEYS if k in flat and flat[k] is not None}
        bad = sorted(set(given) - set(spec.hyperparameters))
        if bad:
            raise ValueError(f"{', '.join(sorted({where(k) for k in bad}))}: loss {loss} takes no hyperparameters "
                             f"{bad}; it takes {list(spec.hyperparameters) or 'none'}")
        values = dict.fromkeys(loss_config_keys(loss))
        for h in spec.params:
            if h.name in given:
                values[h.name] = _check_value(h.name, given[h.name], h.type, h.checks, where(h.name))
        return cls(loss, values)


def loss_config_keys(loss: str) -> tuple[str, ...]:
    """The flat hyperparameter keys a config of ``loss`` carries: every core loss's (``CORE_LOSSES``; None where
    unset, so a recipe's digest is the same with or without plugins and later losses) and the loss's own."""
    core = (k for name in CORE_LOSSES for k in LOSSES[name].hyperparameters)
    return tuple(dict.fromkeys([*core, *LOSSES[loss].hyperparameters]))


@dataclass(frozen=True)
class OptimizerConfig:
    epochs: int = _opt(10, ge=1)
    batch_size: int = _opt(128, ge=1)  # global: split evenly across workers
    lr: float = _opt(0.1, gt=0)
    backbone_lr: float | None = _opt(None, ge=0)  # None = lr; 0 freezes the backbone (classifier retraining)
    momentum: float = _opt(0.9, ge=0, lt=1)
    weight_decay: float = _opt(5.0e-4, ge=0)
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU


@dataclass(frozen=True)
class ScheduleConfig:
    """Per-epoch lr factor (lade_core.train.schedules): linear warmup, then the named decay."""

    name: str = _opt("cosine", choices=SCHEDULES)
    warmup_epochs: int = _opt(0, ge=0)
    milestones: list[int] | None = _opt(None, ge=1)  # multistep: epochs where lr *= gamma, ascending
    step_size: int | None = _opt(None, ge=1)  # step: lr *= gamma every step_size epochs
    gamma: float | None = _opt(None, gt=0, le=1)  # multistep / step decay factor (default 0.1)

    def to_dict(self) -> dict:
        """The set fields: the config's ``schedule`` mapping, as ``lade_core.train.schedules`` reads it."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RuntimeConfig:
    num_workers: int = _opt(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = _opt(1, gt=0)
    # Extra Ray resources each training worker reserves, e.g. {"trainer": 1} to keep workers on the nodes that
    # advertise that custom resource (``ray start --resources='{"trainer": 1}'``).
    worker_resources: dict | None = None
    seed: int = _opt(0, ge=0, le=2**32 - 1)  # numpy's seeds are 32-bit
    experiment: str = _opt("lade", nonempty=True)
    run_name: str | None = _opt(None, name=True)  # None: <dataset>-<loss>-<config digest>
    mlflow_uri: str | None = _opt(None, nonempty=True)  # None: sqlite store ./mlflow.db
    register: str | None = _opt(None, name=True)  # registered model name for the final model
    storage_path: str | None = _opt(None, nonempty=True)  # checkpoints: a local path or a URI (s3://, gs://)
    max_failures: int = _opt(1, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)
    progress: bool = True  # per-epoch progress bar on the driver's console (train.py: off when not a terminal)
    # Where the training worker's images are decoded and augmented (data.decode_place): `ray_data` tasks on the
    # cluster's CPUs, the training worker itself (`worker`), the worker's GPU (`device`: nvJPEG + batched
    # augmentation), or `auto`: the worker on CPUs, its GPU where that works, else Ray Data.
    decode: str = _opt("auto", choices=DECODE_PLACES)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DatasetConfig, "augment": AugmentConfig, "loss": LossConfig,
                             "optimizer": OptimizerConfig, "runtime": RuntimeConfig}
# Flat config key -> its section; `schedule` is the one nested key (a ScheduleConfig).
KEY_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                               if cls is not LossConfig}
KEY_SECTION.update({"loss": "loss", **dict.fromkeys(LOSS_KEYS, "loss"), "schedule": "schedule"})
CONFIG_KEYS = tuple(KEY_SECTION)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings, typed and checked. ``to_dict()`` is the flat form the pipelines pass around."""

    model: ModelConfig
    data: DatasetConfig
    augment: AugmentConfig
    loss: LossConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    runtime: RuntimeConfig

    @classmethod
    def from_dict(cls, flat: dict, origins: dict | None = None) -> TrainConfig:
        """Build from a flat dict; every error names the key and where its value came from (``origins``)."""
        origins = origins or {}
        unknown = sorted(set(flat) - set(KEY_SECTION))
        if unknown:
            where = sorted({origins.get(k, "config") for k in unknown})
            raise ValueError(f"{', '.join(where)}: unknown config keys {unknown}; known keys: {sorted(KEY_SECTION)}")
        parts = {}
        for name, section in SECTIONS.items():
            if section is LossConfig:
                parts[name] = LossConfig.build(flat, lambda k: origins.get(k, "config"))
                continue
            values = {f.name: flat[f.name] for f in dataclasses.fields(section) if f.name in flat}
            parts[name] = _build(section, values, lambda k: origins.get(k, "config"), "")
        schedule = flat.get("schedule", {})
        where = lambda k: origins.get("schedule", "config")  # noqa: E731
        if not isinstance(schedule, dict):
            raise ValueError(f"{where('')}: schedule must be a mapping such as {{name: cosine}}, got {schedule!r}")
        unknown = sorted(set(schedule) - {f.name for f in dataclasses.fields(ScheduleConfig)})
        if unknown:
            raise ValueError(f"{where('')}: unknown schedule keys {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(ScheduleConfig)]}")
        parts["schedule"] = _build(ScheduleConfig, schedule, where, "schedule.")
        config = cls(**parts)
        config._check_together(lambda k: origins.get(k, "config"))
        return config

    def _check_together(self, where) -> None:
        """Rules that span fields."""
        m = self.model
        if m.peft_rank is not None and m.peft not in ("adaptformer", "lora"):
            raise ValueError(f"{where('peft_rank')}: peft_rank has no effect with peft {m.peft}: only adaptformer "
                             "and lora have a rank")
        s = self.schedule
        if s.name == "multistep" and not s.milestones:
            raise ValueError(f"{where('schedule')}: schedule multistep needs milestones, e.g. [120, 160]")
        if s.name == "step" and s.step_size is None:
            raise ValueError(f"{where('schedule')}: schedule step needs step_size")
        for key, used_by in (("milestones", ("multistep",)), ("step_size", ("step",)),
                             ("gamma", ("multistep", "step"))):
            if getattr(s, key) is not None and s.name not in used_by:
                raise ValueError(f"{where('schedule')}: schedule.{key} has no effect with schedule {s.name}")
        if s.milestones and list(s.milestones) != sorted(set(s.milestones)):
            raise ValueError(f"{where('schedule')}: schedule.milestones must be strictly ascending, got {s.milestones}")
        loss = self.loss.values
        if loss.get("class_weight_power") is not None and loss.get("class_weights") is not None:
            raise ValueError(f"{where('class_weight_power')}: set class_weights or class_weight_power, not both: the "
                             "power derives alpha_c from the source prior")
        for key in LOSSES[self.loss.loss].epoch_keys:
            value = loss[key]
            if value is not None and value >= self.optimizer.epochs:
                raise ValueError(f"{where(key)}: {key} {value} is beyond the run: epochs are "
                                 f"0..{self.optimizer.epochs - 1}")
        hard = LOSSES[self.loss.loss].hard_targets_only
        for key in ("mixup", "cutmix"):
            if getattr(self.augment, key) is not None and hard:
                raise ValueError(f"{where(key)}: {key} trains on mixed (soft) targets, which loss {self.loss.loss} "
                                 f"cannot take: {hard}")
        if self.optimizer.batch_size < self.runtime.num_workers:
            raise ValueError(f"{where('batch_size')}: batch_size {self.optimizer.batch_size} is smaller than "
                             f"num_workers {self.runtime.num_workers}")
        extra = self.runtime.worker_resources or {}
        bad = {k: v for k, v in extra.items() if not isinstance(k, str) or k in ("CPU", "GPU") or isinstance(v, bool)
               or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
        if bad:
            raise ValueError(f"{where('worker_resources')}: worker_resources must map custom resource names (not CPU "
                             f"or GPU: use cpus_per_worker / use_gpu) to amounts >= 0; bad entries {bad}")
        synthetic = self.data.synthetic
        if synthetic is not None:
            from lade_core.data.synthetic import make_synthetic

            known = set(inspect.signature(make_synthetic).parameters)
            if set(synthetic) - known:
                raise ValueError(f"{where('synthetic')}: unknown synthetic keys {sorted(set(synthetic) - known)}; "
                                 f"known: {sorted(known)}")

    def to_dict(self) -> dict:
        flat = {k: v for name in SECTIONS if name != "loss" for k, v in dataclasses.asdict(getattr(self, name)).items()}
        flat.update({"loss": self.loss.loss, **self.loss.values})
        flat["schedule"] = self.schedule.to_dict()
        return flat

    def replace(self, **flat) -> TrainConfig:
        """This config with some flat keys set to what the run resolved (an absolute dataset path, the tracking
        URI, the resolved augment list, a trial's run name, the loss's defaults filled in). Not checked again:
        the values come from this checked config or from lade itself."""
        sections: dict[str, dict] = {}
        for key, value in flat.items():
            section = KEY_SECTION.get(key)
            if section is None or section == "schedule":
                raise KeyError(f"TrainConfig.replace: {key!r} is not a flat config key it can set")
            sections.setdefault(section, {})[key] = value
        parts = {}
        for name, values in sections.items():
            old = getattr(self, name)
            if name == "loss":
                loss = values.pop("loss", old.loss)
                parts[name] = LossConfig(loss, {**old.values, **values})
            else:
                parts[name] = dataclasses.replace(old, **values)
        return dataclasses.replace(self, **parts)

    def with_loss_defaults(self) -> TrainConfig:
        """The loss's hyperparameters that were left unset given their defaults (``loss_hyperparameters``): what a
        run records (MLflow params, the checkpoint's config, the digest) is the values its loss uses."""
        return self.replace(**loss_hyperparameters(self))



def _build(cls: type, values: dict, where, prefix: str):
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            out[f.name] = _check_value(f"{prefix}{f.name}", values[f.name], hints[f.name], f.metadata,
                                       where(f.name))
    return cls(**out)


_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings", dict: "mappings"}


def _check_value(key: str, value, tp, checks, where: str):
    """``value`` as type ``tp`` (Optional, list, int, float, bool, str, dict) within the field's ``checks``."""
    def fail(what: str):
        raise ValueError(f"{where}: {key} {what}, got {value!r}")

    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            fail(f"must be a list of {_PLURAL[args[0]]}")
        return [_check_value(f"{key}[{i}]", v, args[0], checks, where) for i, v in enumerate(value)]
    if "check" in checks:  # a value of its own structure (a model name, an augment list, ...): its checker says
        try:
            return checks["check"](value)
        except ValueError as e:
            raise ValueError(f"{where}: {key}: {e}") from None
    if tp is bool:
        if not isinstance(value, bool):
            fail("must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("must be an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("must be a finite number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            fail("must be a string")
    elif tp is dict:
        if not isinstance(value, dict):
            fail("must be a mapping")
        return value
    if "choices" in checks and value not in checks["choices"]:
        fail(f"must be one of {list(checks['choices'])}")
    if "ge" in checks and value < checks["ge"]:
        fail(f"must be >= {checks['ge']}")
    if "gt" in checks and value <= checks["gt"]:
        fail(f"must be > {checks['gt']}")
    if "le" in checks and value > checks["le"]:
        fail(f"must be <= {checks['le']}")
    if "lt" in checks and value >= checks["lt"]:
        fail(f"must be < {checks['lt']}")
    if checks.get("nonempty") and not value.strip():
        fail("must not be empty")
    if checks.get("name") and (not value.strip() or "/" in value or "\\" in value or value in (".", "..")
                               or any(ord(ch) < 32 for ch in value)):
        fail("must be a non-empty name without path separators or control characters")
    if checks.get("existing_file") and not Path(value).is_file():
        fail("is not an existing file")
    return value


DEFAULTS: dict = TrainConfig.from_dict({}).to_dict()


def loss_hyperparameters(config: TrainConfig) -> dict:
    """The config's loss hyperparameters with the loss's defaults filled in (what ``build_loss`` gets): the paper's,
    and for an epoch number (``LossSpec.epoch_keys``) its fraction of this run, e.g. ldam_drw's re-weighting from
    80 % of the run as in its recipe (160 of 200)."""
    spec = LOSSES[config.loss.loss]
    defaults = {**spec.defaults, **{k: int(f * config.optimizer.epochs) for k, f in spec.epoch_keys.items()}}
    return {k: v if (v := config.loss.values.get(k)) is not None else defaults[k] for k in spec.hyperparameters}


def model_finetuning(model: ModelConfig) -> Finetuning:
    """The backbone's fine-tuning as ``models.build_model`` takes it: the config's peft and rank (the driver fills
    in the default rank, ``runs.check_against_dataset``) and, with text_init, the CLIP embedding's width read from
    the text tower's config."""
    projection = (text_embedding_dim(text_tower_source(model.model, model.pretrained, model.pretrained_file))
                  if model.text_init else None)
    return Finetuning(model.peft, model.peft_rank, projection, TEXT_HEAD_SCALE if projection else None)


def check_runnable(config: TrainConfig, num_classes: int | None = None) -> None:
    """What a config needs to train beyond its own checks: a dataset, and (given the dataset's ``num_classes``)
    class weights of its length."""
    w = config.loss.values.get("class_weights")
    if w is not None and num_classes is not None and len(w) != num_classes:
        raise ValueError(f"class_weights has wrong length: {len(w)} entries for {num_classes} classes")
    if not config.data.dataset:
        raise ValueError("no dataset: set `dataset` (a prepared dataset directory) in the config or with --dataset")


def validate_config(cfg: dict, num_classes: int | None = None) -> dict:
    """A flat config (with derived keys beside it, passed through) checked as a run checks it, plus the checks
    that need the dataset: returns the normalized dict with the loss's defaults filled in."""
    config = TrainConfig.from_dict({k: v for k, v in cfg.items() if k in KEY_SECTION})
    check_runnable(config, num_classes)
    return {**cfg, **config.with_loss_defaults().to_dict()}
