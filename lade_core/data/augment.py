"""Images as a run sees them, as data: the training augmentation (a list of torchvision ``transforms.v2`` entries), the
deterministic evaluation transform of the dataset's family, and the normalization statistics.

An ``augment`` entry is ``{ClassName: {kwargs}}`` of a ``torchvision.transforms.v2`` transform, applied in order to
the decoded uint8 [3, H, W] image on Ray Data's CPUs; its output must be uint8 [3, S, S] at the run's crop size S.
The families (``cifar``, ``imagenet``) are named presets of it. Everything here is checked on the driver before
Ray starts (``check_augment`` for names and kwargs, ``resolve_augment`` for the output size), and what a run
trains with is the resolved list: saved in its checkpoint, logged to MLflow, part of its config digest.

Augmentation is seeded per (seed, epoch, sample) (``sample_seeds``): a sample gets the same crop in epoch e of
every run of the same command, whichever worker decodes it and in whatever order Ray Data runs its tasks.
"""
from __future__ import annotations

import difflib
import json
import math
from functools import lru_cache

import numpy as np
import torch
from torchvision.transforms import v2

from lade_core.registry import Registry

# The families' presets: (train augment at crop size s, normalization statistics, default crop size). CIFAR-100
# and ImageNet statistics and augmentations as in torchvision's classification references.
PRESETS: Registry[dict] = Registry("transform", {
    "cifar": {"augment": lambda s: [{"RandomCrop": {"size": s, "padding": 4}}, {"RandomHorizontalFlip": {}}],
              "mean": (0.507, 0.487, 0.441), "std": (0.267, 0.256, 0.276), "size": 32},
    "imagenet": {"augment": lambda s: [{"RandomResizedCrop": {"size": s, "antialias": True}},
                                       {"RandomHorizontalFlip": {}},
                                       {"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}}],
                 "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "size": 224},
})
FAMILIES = tuple(PRESETS)


def _blur_kernel(size: int) -> int:
    """MoCo v2's Gaussian blur kernel: about a tenth of the crop, odd, at least 3 (23 at 224, 3 at 32)."""
    return max(3, int(round(0.1 * size)) // 2 * 2 + 1)


# Transforms that are not per-image augmentations of a uint8 image: batch mixing needs the labels (the config's
# ``mixup`` / ``cutmix`` keys do it on the worker), and dtype / normalization steps belong to ``normalize``.
_REFUSED = {"MixUp": "use the config key `mixup: {alpha: ...}`", "CutMix": "use the config key `cutmix: {alpha: ...}`",
            "Normalize": "normalization is the config key `normalize`", "ToDtype": "images stay uint8 until normalize",
            "ToImage": "images are already tensors", "ToPILImage": "images stay tensors",
            "ToPureTensor": "images are already tensors", "Lambda": "code cannot come from a config",
            "ConvertImageDtype": "images stay uint8 until normalize"}


class AugmentError(ValueError):
    """An ``augment`` or ``normalize`` value a run could not use."""


def default_image_size(family: str) -> int:
    """The crop size of a family when neither the config nor the prepared dataset sets one."""
    return PRESETS[family]["size"]


def _transform_names() -> list[str]:
    return sorted(n for n in dir(v2) if isinstance(getattr(v2, n), type) and issubclass(getattr(v2, n), v2.Transform)
                  and n not in ("Transform",))


def _entry(entry, where: str) -> tuple[str, dict]:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise AugmentError(f"{where}: an augment entry is one {{TransformName: {{kwargs}}}} mapping, got {entry!r}")
    (name, kwargs), = entry.items()
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise AugmentError(f"{where}: {name!r} needs a mapping of keyword arguments, got {kwargs!r}")
    if name in _REFUSED:
        raise AugmentError(f"{where}: {name} is not an augment entry: {_REFUSED[name]}")
    names = _transform_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise AugmentError(f"{where}: unknown transform {name!r} (torchvision.transforms.v2)"
                           + (f"; did you mean {close}?" if close else ""))
    return name, kwargs


def _kwargs(name: str, kwargs: dict, where: str) -> dict:
    """YAML values -> what the transform's constructor takes: nested entries (RandomApply's ``transforms``) built,
    ``interpolation`` / ``policy`` names turned into torchvision's enums."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, list) and v and all(isinstance(e, dict) and len(e) == 1 for e in v):
            v = [_build(e, f"{where}.{name}.{k}[{i}]") for i, e in enumerate(v)]
        elif k == "interpolation" and isinstance(v, str):
            v = _enum(v2.InterpolationMode, v, f"{where}: {name} interpolation")
        elif k == "policy" and isinstance(v, str):
            v = _enum(v2.AutoAugmentPolicy, v, f"{where}: {name} policy")
        out[k] = v
    return out


def _enum(enum, value: str, where: str):
    for member in enum:
        if value.lower() in (member.value, member.name.lower()):
            return member
    raise AugmentError(f"{where} {value!r}: choose one of {[m.value for m in enum]}")


def _build(entry, where: str) -> v2.Transform:
    name, kwargs = _entry(entry, where)
    try:
        return getattr(v2, name)(**_kwargs(name, kwargs, where))
    except AugmentError:
        raise
    except (TypeError, ValueError) as e:
        raise AugmentError(f"{where}: {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from None


def check_augment(augment) -> list | str | None:
    """An ``augment`` config value checked without the dataset: None (the dataset family's preset), a preset name,
    or a list of entries whose names exist and whose kwargs their transforms take."""
    if augment is None:
        return None
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise AugmentError(f"augment preset {augment!r} is unknown; the presets are {list(FAMILIES)}, or give a "
                               "list of {TransformName: {kwargs}} entries")
        return augment
    if not isinstance(augment, (list, tuple)):
        raise AugmentError(f"augment must be a preset name or a list of {{TransformName: {{kwargs}}}} entries, got "
                           f"{augment!r}")
    for i, entry in enumerate(augment):
        _build(entry, f"augment[{i}]")
    return [dict(e) if e else e for e in augment]


def resolve_augment(augment, family: str, size: int, input_sizes: list[tuple[int, int]]) -> list[dict]:
    """The list a run trains with: ``augment`` (None: the family's preset; a preset name: that preset) at crop size
    ``size``, checked on uint8 images of each (H, W) in ``input_sizes`` (the sizes the dataset's images come in):
    the output must be uint8 [3, size, size]. The error names the entry that gave another shape or type."""
    augment = check_augment(augment)
    specs = PRESETS[augment or family]["augment"](size) if augment is None or isinstance(augment, str) else augment
    specs = json.loads(json.dumps(specs))  # plain JSON values: what the checkpoint, MLflow and the digest hold
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for h, w in input_sizes:
            x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
            for i, entry in enumerate(specs):
                try:
                    x = _build(entry, f"augment[{i}]")(x)
                except AugmentError:
                    raise
                except (RuntimeError, TypeError, ValueError) as e:
                    raise AugmentError(f"augment[{i}] {next(iter(entry))} fails on a {h}x{w} image: {e}") from None
                if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
                    got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                    raise AugmentError(f"augment[{i}] {next(iter(entry))} turns a uint8 [3, {h}, {w}] image into "
                                       f"{got}; every step must keep uint8 [3, H, W]")
            if tuple(x.shape[1:]) != (size, size):
                raise AugmentError(f"augment gives {x.shape[1]}x{x.shape[2]} images from {h}x{w} inputs, not the crop "
                                   f"size {size}x{size}: end it with a crop or resize to {size} (e.g. "
                                   f"{{RandomCrop: {{size: {size}, padding: 4}}}} or {{RandomResizedCrop: {{size: "
                                   f"{size}}}}})")
    return specs


def view_augment(family: str, size: int, input_sizes: list[tuple[int, int]]) -> list[dict]:
    """The resolved ``augment`` list of the two augmented views of each target image that test-time aggregation
    compares, at crop ``size``: SADE's test-time training views (``test_training_{cifar,imagenet}.py`` of its
    release, MoCo v2's recipe), the same for every run of a family so two runs' stored views are drawn alike;
    checked on the dataset's input sizes like a training augment list (``resolve_augment``)."""
    crop = ({"RandomCrop": {"size": size, "padding": 4}} if family == "cifar" else
            {"RandomResizedCrop": {"size": size, "scale": [0.2, 1.0], "antialias": True}})
    blur = {"GaussianBlur": {"kernel_size": _blur_kernel(size), "sigma": [0.1, 2.0]}}
    views = [crop,
             {"RandomApply": {"transforms": [{"ColorJitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                                              "hue": 0.1}}], "p": 0.8}},
             {"RandomGrayscale": {"p": 0.2}},
             {"RandomApply": {"transforms": [blur], "p": 0.2 if family == "cifar" else 0.5}},
             {"RandomHorizontalFlip": {}}]
    return resolve_augment(views, family, size, input_sizes)


@lru_cache(maxsize=64)
def _compose(specs_json: str) -> v2.Compose:
    return v2.Compose([_build(e, f"augment[{i}]") for i, e in enumerate(json.loads(specs_json))])


def build_augment(specs: list[dict]) -> v2.Compose:
    """The torchvision pipeline of a resolved ``augment`` list (cached per list)."""
    return _compose(json.dumps(specs, sort_keys=True))


@lru_cache(maxsize=None)
def eval_transform(family: str, size: int) -> v2.Compose:
    """The deterministic evaluation transform: CenterCrop (cifar) or Resize(size * 256 / 224) + CenterCrop
    (imagenet), on uint8 [3, H, W]."""
    if family == "cifar":
        return v2.Compose([v2.CenterCrop(size)])
    return v2.Compose([v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size)])


def crop_flip(specs: list[dict]) -> tuple[int, int, float] | None:
    """(size, padding, flip probability) if ``specs`` is RandomCrop(size, padding) with zero fill, optionally
    followed by RandomHorizontalFlip(p): the case ``transforms.crop_flip_batch`` runs vectorized; else None."""
    if not 1 <= len(specs) <= 2 or next(iter(specs[0])) != "RandomCrop":
        return None
    crop = dict(specs[0]["RandomCrop"] or {})
    size, padding = crop.pop("size", None), crop.pop("padding", 0) or 0
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if (not isinstance(size, int) or not isinstance(padding, int) or crop.get("fill", 0) != 0
            or crop.get("padding_mode", "constant") != "constant" or crop.get("pad_if_needed", False)
            or set(crop) - {"fill", "padding_mode", "pad_if_needed"}):
        return None
    p = 0.0
    if len(specs) == 2:
        name, kwargs = next(iter(specs[1].items()))
        if name != "RandomHorizontalFlip" or set(kwargs or {}) - {"p"}:
            return None
        p = float((kwargs or {}).get("p", 0.5))
    return size, padding, p


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _MIX
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def augment_seed(seed: int, epoch: int) -> int:
    """The augmentation seed of one epoch of a run (``sample_seeds`` mixes in each sample's index)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 0xA06]).generate_state(1, np.uint64)[0])


def sample_seeds(seed: int, index: np.ndarray) -> np.ndarray:
    """One 64-bit seed per sample [B] from an epoch's ``augment_seed`` and the samples' split indices [B]:
    independent of the batch, the worker and the order rows arrive in."""
    return _splitmix64(_splitmix64(np.asarray(index, dtype=np.uint64) ^ np.uint64(seed)))


# --- normalization ---------------------------------------------------------------------------------------------

def check_normalize(value) -> dict | str | None:
    """A ``normalize`` config value: None (the family's statistics), ``dataset`` (the training split's, computed
    at preparation), or ``{mean: [3 numbers], std: [3 numbers > 0]}`` on the [0, 1] scale."""
    if value is None or value == "dataset":
        return value
    if isinstance(value, str) and value in PRESETS:
        return value
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise AugmentError(f"normalize must be `dataset`, a family name {list(FAMILIES)}, or {{mean: [r, g, b], std: "
                           f"[r, g, b]}}; got {value!r}")
    for key in ("mean", "std"):
        v = value[key]
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v)):
            raise AugmentError(f"normalize.{key} must be 3 finite numbers (one per RGB channel: images are decoded "
                               f"to 3 channels), got {v!r}")
    if any(x <= 0 for x in value["std"]):
        raise AugmentError(f"normalize.std must be > 0 in every channel, got {value['std']!r}")
    return {"mean": [float(x) for x in value["mean"]], "std": [float(x) for x in value["std"]]}


def resolve_normalize(value, family: str, channel_stats: dict | None) -> dict:
    """{mean: [3], std: [3]} a run normalizes with: the family's, the dataset's (``channel_stats`` from the
    manifest), or the ones given."""
    value = check_normalize(value)
    if value is None or isinstance(value, str) and value in PRESETS:
        preset = PRESETS[value or family]
        return {"mean": list(preset["mean"]), "std": list(preset["std"])}
    if value == "dataset":
        if not channel_stats:
            raise AugmentError("normalize: dataset needs the training split's channel statistics, which this prepared "
                               "dataset lacks (prepared by an older lade): prepare it again with --overwrite")
        return check_normalize({"mean": channel_stats["mean"], "std": channel_stats["std"]})
    return value


class ChannelStats:
    """Running per-channel sums of uint8 [3, H, W] images, for the mean and std on the [0, 1] scale."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, np.zeros(3), np.zeros(3)

    @staticmethod
    def sums(images: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
        """(pixels, per-channel sum [3], per-channel sum of squares [3]) of uint8 images [3, ...]."""
        x = images.reshape(3, -1).to(torch.int64)  # exact: 255^2 * 2^40 pixels still fit
        return x.shape[1], x.sum(1).numpy().astype(np.float64), (x * x).sum(1).numpy().astype(np.float64)

    def add_sums(self, n: int, s: np.ndarray, ss: np.ndarray) -> None:
        self.n, self.s, self.ss = self.n + n, self.s + s, self.ss + ss

    def add(self, images: torch.Tensor) -> None:
        """Add uint8 images [3, ...] (one image [3, H, W] or a batch [3, B, H, W])."""
        self.add_sums(*self.sums(images))

    def result(self) -> dict:
        mean = self.s / max(self.n, 1)
        var = np.maximum(self.ss / max(self.n, 1) - mean ** 2, 0)
        return {"mean": [round(float(m) / 255, 6) for m in mean],
                "std": [round(float(math.sqrt(v)) / 255, 6) for v in var]}
