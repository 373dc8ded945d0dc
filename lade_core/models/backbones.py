"""Model factories: lade's CIFAR ResNet-32, every torchvision classification model and (``lade[timm]``) every timm
model as ``timm:NAME``, each with the classifier head ``fc`` the loss trains (``lade_core.math.heads``; linear unless
the loss says otherwise, ``losses.classifier_head``) in place of the model's own classifier.

``pretrained`` loads the library's weights for the backbone (torchvision's named weights, timm's pretrained tags)
from its own cache, downloading as that library does where there is internet; ``weights_path`` loads a local state
dict. Constructors never move to a device; the training loop does (Ray Train's ``prepare_model``).
"""
from __future__ import annotations

import copy
import difflib
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lade_core.math.heads import build_head
from lade_core.models.foundation import Finetuning, apply_peft, cosine_head, trainable_fraction, transformer_blocks
from lade_core.registry import Registry

Head = tuple[str, dict]  # (kind in heads.HEADS, its keyword arguments)
LINEAR: Head = ("linear", {})
FULL = Finetuning()  # no adapters, every parameter trains, the loss's own head


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ExpertStages(nn.Module):
    """A backbone's last stages, one copy per expert, run side by side: x [B, ...] -> [E * B, ...] expert-major
    (expert e's output is rows e * B .. (e + 1) * B - 1). What follows them in the model (pooling, flattening) acts
    per sample, so it runs unchanged on every expert at once, and ``heads.ExpertHeads(own_features=True)`` reads
    the experts' features back as [E, B, D]. The layout of SADE and RIDE: shared early stages, each expert its own
    later ones and its own classifier."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([stage(x) for stage in self.stages])


# SADE's ``reduce_dimension``: its CIFAR experts' stages are 3/4 as wide as the plain ResNet's (24 and 48 channels
# for 32 and 64), so three experts with their own last two stages cost about 1.5x one plain ResNet-32, not 2.3x.
# BalPoE's released ResNet-32 keeps the full width; lade builds both at this one, so the two methods are compared
# at the same compute. (A torchvision or timm ResNet's expert stages are copies of its own, at its width.)
EXPERT_WIDTH = 0.75
# The stages of torchvision's and timm's ResNet families (ResNet, ResNeXt, Wide ResNet, ...), split for experts.
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _cifar_stage(c_in: int, c_out: int, stride: int, n: int) -> list[nn.Module]:
    return [_BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)]


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


class CifarResNet(nn.Module):
    """The standard 3-stage CIFAR ResNet (He et al. 2016): depth = 6n + 2, widths 16/32/64."""

    WIDTHS, STRIDES = (16, 32, 64), (1, 2, 2)

    def __init__(self, depth: int = 32, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        self.n = n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, c_in = [], 16
        for c_out, stride in zip(self.WIDTHS, self.STRIDES):
            layers += _cifar_stage(c_in, c_out, stride, n)
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def split_experts(self, num_experts: int, stages: int) -> int:
        """Give each of ``num_experts`` experts its own last ``stages`` stages (1-3), newly initialized at SADE's
        reduced width (``EXPERT_WIDTH``), run side by side (``ExpertStages``); returns the experts' feature
        dimension. The stem and the stages before stay shared (SADE's ``ResNet_s``: layer1 shared, layer2s and
        layer3s per expert, ``stages=2``)."""
        first = 3 - stages  # the first stage the experts own
        shared = list(self.features)[:first * self.n]
        c_shared = self.WIDTHS[first - 1] if first else 16
        experts = []
        for _ in range(num_experts):
            blocks, c_in = [], c_shared
            for s in range(first, 3):
                c_out = round(self.WIDTHS[s] * EXPERT_WIDTH)
                blocks += _cifar_stage(c_in, c_out, self.STRIDES[s], self.n)
                c_in = c_out
            experts.append(nn.Sequential(*blocks))
        own = ExpertStages(experts)
        _kaiming_init(own)
        self.features = nn.Sequential(*shared, own)
        return c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 3, H, W] -> logits [B, C]
        h = self.features(self.stem(x))  # [B, 64, H/4, W/4]; [E * B, 48, H/4, W/4] with experts' own stages
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Backbone(nn.Module):
    """A torchvision or timm classification model with its own final linear classifier taken out (``backbone``:
    images [B, 3, H, W] -> pooled features [B, D]) and the head the loss trains as ``fc`` (features -> logits
    [B, C]), so every model keeps its classifier at ``fc``, the one place the optimizer's classifier learning
    rate, Causal Norm's feature direction and tau-normalization look for it."""

    def __init__(self, backbone: nn.Module, fc: nn.Module, classifier_path: str,
                 finetuning: Finetuning = FULL):
        super().__init__()
        self.backbone, self.fc = backbone, fc
        self.classifier_path = classifier_path  # where the model kept its classifier (foreign checkpoints' keys)
        self.finetuning = finetuning

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.finetuning.peft == "linear":  # a linear probe: the frozen backbone's features as at inference
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 3, H, W] -> logits [B, C]
        return self.fc(self.backbone(x))


TIMM_PREFIX = "timm:"
# lade's own architectures; every torchvision classification model and (lade[timm]) every timm model also build.
MODELS: Registry[Callable[[int], nn.Module]] = Registry("model")


@MODELS.register("resnet32")
def resnet32(num_classes: int) -> nn.Module:
    """ResNet-32 for 32-pixel images (He et al. 2016, Sec. 4.2), the backbone of the paper's CIFAR-100-LT runs."""
    return CifarResNet(32, num_classes)


@lru_cache(maxsize=None)
def torchvision_models() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


@lru_cache(maxsize=None)
def _timm_models() -> frozenset[str]:
    return frozenset(_timm().list_models())


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need timm: pip install 'lade[timm]'") from None
    return timm


def check_model_name(name: str) -> str:
    """``name`` if lade can build it (its own, torchvision's ``list_models()``, or ``timm:NAME``), else one error
    with the close matches."""
    if not isinstance(name, str):
        raise ValueError(f"model must be a name, got {name!r}")
    if name.startswith(TIMM_PREFIX):
        known = _timm_models()
        if name[len(TIMM_PREFIX):] in known:
            return name
        close = [TIMM_PREFIX + m for m in difflib.get_close_matches(name[len(TIMM_PREFIX):], sorted(known), n=3)]
    else:
        known = [*MODELS, *torchvision_models()]
        if name in known:
            return name
        close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"unknown model {name!r}" + (f"; did you mean {close}?" if close else "")
                     + f"; lade builds {sorted(MODELS)}, every torchvision classification model "
                     "(torchvision.models.list_models()) and timm:NAME for any timm model")


def check_pretrained(name: str, pretrained: str | None) -> None:
    """An error unless model ``name`` has pretrained weights ``pretrained`` (torchvision: a weights name of the
    model's enum such as DEFAULT or IMAGENET1K_V2; timm: DEFAULT or a pretrained tag such as in1k)."""
    if pretrained is None:
        return
    if name in MODELS:
        raise ValueError(f"model {name} has no pretrained weights (it is lade's own); use --weights-path")
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        tags = _timm().list_pretrained(f"{arch}.*")
        if not tags or (pretrained != "DEFAULT" and f"{arch}.{pretrained}" not in tags):
            raise ValueError(f"timm model {arch} has no pretrained weights {pretrained!r}; it has "
                             f"{[t.split('.', 1)[1] for t in tags] or 'none'} (or DEFAULT)")
        return
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
    except (KeyError, ValueError):
        raise ValueError(f"torchvision model {name} has no pretrained weights") from None
    if pretrained != "DEFAULT" and pretrained not in weights.__members__:
        raise ValueError(f"torchvision model {name} has no weights {pretrained!r}; choose DEFAULT or one of "
                         f"{[w for w in weights.__members__ if w != 'DEFAULT']}")


def _final_linear(model: nn.Module, out_features: int) -> str:
    """The dotted path of a model's classifier: its last linear layer with ``out_features`` outputs."""
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == out_features]
    if not paths:
        raise ValueError(f"model {type(model).__name__} has no linear classifier lade can replace with its head")
    return paths[-1]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _external(name: str, pretrained: str | None, pretrained_file: str | None = None,
              projection: int | None = None) -> tuple[nn.Module, str, int]:
    """(backbone without its classifier, where the classifier was, feature dimension) of a torchvision or timm
    model, with pretrained weights (from the library's own cache, downloaded as it normally does, or from
    ``pretrained_file``) if asked. ``projection``: a timm CLIP image tower keeps its image projection (its
    ``head``, that many outputs) and returns the CLIP image embedding (``foundation``, text_init)."""
    if name.startswith(TIMM_PREFIX):
        timm, arch = _timm(), name[len(TIMM_PREFIX):]
        tagged = arch if pretrained in (None, "DEFAULT") else f"{arch}.{pretrained}"
        if pretrained_file is None:
            model = timm.create_model(tagged, pretrained=pretrained is not None,
                                      **({"num_classes": projection} if projection else {}))
        else:  # timm's own loader on a local file: its checkpoint filter converts e.g. an open_clip checkpoint
            # The overlay's class count is the file's classifier: kept as the projection, else dropped by timm.
            overlay = {"file": str(Path(pretrained_file).resolve()),
                       **({"num_classes": projection} if projection else {})}
            try:
                model = timm.create_model(tagged, pretrained=True, num_classes=projection or 0,
                                          pretrained_cfg_overlay=overlay)
            except (RuntimeError, KeyError, ValueError, AssertionError) as e:
                raise ValueError(f"pretrained file {pretrained_file} does not fit model {name}: "
                                 f"{' '.join(str(e).split())[:400]}") from None
        path = model.pretrained_cfg.get("classifier") or "head"
        if projection:
            return model, path, projection  # its head is the CLIP image projection, part of the backbone
        classifier = model.get_classifier()
        # The classifier's input: timm's head_hidden_size (>= 1.0) where the file's loader already dropped it.
        dim = (classifier.in_features if isinstance(classifier, nn.Linear)
               else getattr(model, "head_hidden_size", None) or model.num_features)
        model.reset_classifier(0)  # the pooled features out; the head is lade's ``fc``
        return model, path, dim
    if pretrained_file is not None:
        raise ValueError(f"pretrained_file loads timm models (timm:NAME); for torchvision model {name} pass the state "
                         "dict as weights_path (--weights-path)")
    import torchvision

    # Without weights the Inception models build without their auxiliary classifiers (and with their own init).
    extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    weights = None
    if pretrained is not None:
        enum = torchvision.models.get_model_weights(name)
        weights = enum.DEFAULT if pretrained == "DEFAULT" else enum[pretrained]
        extra = {}  # the weights' own settings (the Inception models keep their auxiliary heads to load them)
    model = torchvision.models.get_model(name, weights=weights, **extra)
    for aux in ("AuxLogits", "aux1", "aux2"):  # auxiliary classifiers: not part of a lade model
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    path = _final_linear(model, len(weights.meta["categories"]) if weights is not None else 1000)
    dim = model.get_submodule(path).in_features
    _set_module(model, path, nn.Identity())
    return model, path, dim


def _architecture(name: str, num_classes: int, head: Head, pretrained: str | None = None,
                  finetuning: Finetuning = FULL, pretrained_file: str | None = None) -> nn.Module:
    if finetuning.projection is not None:  # text_init: a cosine classifier over the CLIP embedding
        head = cosine_head(head, finetuning.scale)
    kind, kwargs = head
    stages = 0
    if kind == "experts":  # a card written before experts could own stages has no expert_stages: a shared backbone
        kwargs = dict(kwargs)
        stages = kwargs.pop("expert_stages", 0)
        if stages:
            kwargs["own_features"] = True  # each expert's classifier reads its own stages' features
    if name in MODELS:
        if finetuning.peft != "none" or finetuning.projection is not None:
            raise ValueError(f"model {name} is lade's own, trained from scratch: peft and text_init fine-tune a "
                             "pretrained timm or torchvision model")
        model = MODELS[name](num_classes)
        dim = model.fc.in_features
        if stages:
            if not hasattr(model, "split_experts") or stages > len(model.WIDTHS):
                raise _cannot_split(name, stages)
            dim = model.split_experts(kwargs["num_experts"], stages)
        if kind != "linear":
            model.fc = build_head(kind, dim, num_classes, **kwargs)
        return model
    backbone, path, dim = _external(name, pretrained, pretrained_file, finetuning.projection)  # name checked
    key_map: list[tuple[str, str]] = []
    if stages:
        if not all(isinstance(getattr(backbone, n, None), nn.Module) for n in RESNET_STAGES) \
                or stages > len(RESNET_STAGES):
            raise _cannot_split(name, stages)
        # Experts trained from scratch start from independently initialized stages (as SADE's do), each from a
        # model of its own; pretrained experts all start from the library's weights.
        fresh = None if pretrained is not None else (lambda: _external(name, None)[0])
        key_map = _split_resnet(backbone, fresh, kwargs["num_experts"], stages)
    fc = nn.Linear(dim, num_classes) if kind == "linear" else build_head(kind, dim, num_classes, **kwargs)
    model = Backbone(backbone, fc, path, finetuning)
    model.expert_key_map = [(f"backbone.{old}", f"backbone.{new}") for old, new in key_map]
    return model


def _cannot_split(name: str, stages: int) -> ValueError:
    return ValueError(f"model {name} cannot give each expert its own last {stages} stage(s): lade splits its "
                      f"resnet32 (up to 3 stages) and the ResNet families of torchvision and timm (the models with "
                      f"{'..'.join(RESNET_STAGES[::3])}, up to 4); with expert_stages 0 (--expert-stages 0) the "
                      "experts have their own classifiers on the shared backbone")


def _split_resnet(backbone: nn.Module, fresh: Callable[[], nn.Module] | None, num_experts: int,
                  stages: int) -> list[tuple[str, str]]:
    """Give each expert its own copy of a ResNet's last ``stages`` stages (``ExpertStages`` in place of the first
    of them, the rest Identity); expert 0 keeps the model's own, the others come from ``fresh()`` models (or copies
    when it is None). Returns (the stages' key prefixes in the unsplit model, their prefix in the split one with
    ``{e}`` for the expert): how a torchvision or timm checkpoint file loads into every expert."""
    names = RESNET_STAGES[len(RESNET_STAGES) - stages:]

    def stages_of(model: nn.Module) -> nn.Sequential:
        return nn.Sequential(*(getattr(model, n) for n in names))

    own = stages_of(backbone)
    copies = [own] + [stages_of(fresh()) if fresh else copy.deepcopy(own) for _ in range(num_experts - 1)]
    setattr(backbone, names[0], ExpertStages(copies))
    for n in names[1:]:
        setattr(backbone, n, nn.Identity())
    return [(f"{n}.", f"{names[0]}.stages.{{e}}.{j}.") for j, n in enumerate(names)]


def memory_format(model: nn.Module) -> torch.memory_format:
    """The layout to run ``model`` and its [B, 3, H, W] inputs in: channels_last for a model with 2-d convolutions
    (oneDNN's and cuDNN's fast layout for convolutions: on 2 CPU cores, ResNet-32 trains 1.2-1.3x and
    MobileNetV3 1.65x faster in it, bench/README.md), else contiguous (a ViT has nothing to gain)."""
    return torch.channels_last if any(isinstance(m, nn.Conv2d) for m in model.modules()) else torch.contiguous_format


def build_model(name: str, num_classes: int, weights_path: str | None = None, head: Head = LINEAR,
                pretrained: str | None = None, finetuning: Finetuning | None = None,
                pretrained_file: str | None = None) -> nn.Module:
    """Model ``name`` (lade's own, any torchvision classification model, ``timm:NAME``) with classifier head
    ``head`` at ``fc`` for ``num_classes`` classes; ``pretrained``: the library's weights for the backbone;
    ``pretrained_file``: a local copy of them (timm); ``weights_path``: a local state dict (a lade checkpoint, or a
    torchvision / timm one), whose classifier is not loaded when its class count or head differs. ``finetuning``:
    the backbone's adapters and text-initialised head (``foundation``), added after the weights load, so a
    library's checkpoint loads into the model it was saved from."""
    check_model_name(name)
    check_pretrained(name, pretrained)
    finetuning = finetuning or FULL
    model = _architecture(name, num_classes, head, pretrained, finetuning, pretrained_file)
    if weights_path:
        load_backbone_weights(model, name, weights_path)
    return _with_adapters(model, finetuning, name)


def _with_adapters(model: nn.Module, finetuning: Finetuning, name: str) -> nn.Module:
    """``model`` with ``finetuning``'s adapters in its backbone (``foundation.apply_peft``), after any weights."""
    if isinstance(model, Backbone):
        apply_peft(model.backbone, finetuning, name)
    return model


def transformer_depth(name: str) -> int:
    """How many transformer blocks model ``name`` has that adapters can go in (``foundation.transformer_blocks``;
    0 for a model without), counted on the meta device: no compute, no weights."""
    with torch.device("meta"):
        try:
            model = _architecture(name, 2, LINEAR)
        except NotImplementedError:
            return 0
    return len(transformer_blocks(model.backbone)) if isinstance(model, Backbone) else 0


def load_backbone_weights(model: nn.Module, name: str, weights_path: str) -> None:
    """Load a state dict file into ``model``: every backbone weight must come from it (a partial match would train
    the rest from scratch silently); its classifier is skipped when it does not fit the model's head."""
    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if isinstance(model, Backbone) and not any(k.startswith("backbone.") for k in state):
        # The library's own layout (a torchvision / timm checkpoint): its classifier is dropped, the rest is ours.
        cls = model.classifier_path + "."
        state = {f"backbone.{k}": v for k, v in state.items() if not k.startswith(cls)}
    own = model.state_dict()
    # A checkpoint of the unsplit model loads into every expert's own copy of the stages it split (_split_resnet).
    for old, new in getattr(model, "expert_key_map", ()):
        for k in [k for k in state if k.startswith(old) and k not in own]:
            v = state.pop(k)
            state.update({new.format(e=e) + k[len(old):]: v for e in range(model.fc.num_experts)})
    # A backbone checkpoint's classifier (another class count or another head) is not loaded.
    skip = {k for k in state if k.startswith("fc.") and (k not in own or state[k].shape != own[k].shape)}
    state = {k: v for k, v in state.items() if k not in skip}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith("fc."))
    shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if unexpected or missing or shapes:
        raise ValueError(f"{path} does not match model {name}: " + "; ".join(
            part for part in (f"keys not in the model {unexpected[:5]}" if unexpected else "",
                              f"backbone keys missing from the file {missing[:5]}" if missing else "",
                              f"other shapes: {shapes[:3]}" if shapes else "") if part))
    model.load_state_dict(state, strict=False)


def load_model_state(model: nn.Module, state: dict) -> None:
    """A lade model's saved state dict into ``model`` (strict); a torchvision model saved by a lade before
    ``Backbone`` (keys without ``backbone.``) loads too."""
    if isinstance(model, Backbone) and not any(k.startswith("backbone.") for k in state):
        state = {k if k.startswith("fc.") else f"backbone.{k}": v for k, v in state.items()}
    model.load_state_dict(state)


def check_input_size(name: str, num_classes: int, image_size: int, batch_size: int, head: Head = LINEAR,
                     finetuning: Finetuning = FULL) -> None:
    """Raise ValueError if the model cannot train on [batch_size, 3, image_size, image_size] inputs (a feature map
    pooled away, BatchNorm with one value per channel). Shapes only: the forward runs on the meta device, so it
    costs no compute and no memory, on the driver, before any worker starts (a model whose constructor cannot
    run there is checked on the CPU with a batch of 2)."""
    def build() -> nn.Module:
        return _with_adapters(_architecture(name, num_classes, head, finetuning=finetuning), finetuning, name).train()

    try:
        with torch.device("meta"):
            model = build()
            x = torch.empty(batch_size, 3, image_size, image_size)
    except NotImplementedError:  # e.g. RegNet's init copies data
        model = build()
        x = torch.zeros(min(batch_size, 2), 3, image_size, image_size)
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ValueError(f"model {name} cannot train on {image_size}x{image_size} images in batches of {batch_size} "
                         f"per worker ({e}); use a larger image_size or batch_size") from None
    experts = getattr(model.fc, "num_experts", None)  # a multi-expert head trains on every expert's logits
    want = (len(x), num_classes) if experts is None else (len(x), experts, num_classes)
    if tuple(out.shape) != want:
        raise ValueError(f"model {name} maps {image_size}x{image_size} images to {tuple(out.shape)}, not "
                         f"{list(want)} logits")


def parameter_counts(name: str, num_classes: int, head: Head = LINEAR,
                     finetuning: Finetuning = FULL) -> tuple[int, int]:
    """(trainable, total) parameters of the model ``build_model`` builds, counted on the meta device."""
    with torch.device("meta"):
        model = _with_adapters(_architecture(name, num_classes, head, finetuning=finetuning), finetuning, name)
    return trainable_fraction(model)


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier head's parameters (for a separate classifier learning rate)."""
    return list(model.fc.parameters())


# --- A multi-expert model (heads.ExpertHeads) --------------------------------------------------------------

def has_experts(model: nn.Module) -> bool:
    """Whether ``model``'s classifier is a multi-expert head (``heads.ExpertHeads``)."""
    return hasattr(getattr(model, "fc", None), "emit_experts")


@contextmanager
def expert_outputs(model: nn.Module):
    """Within it, ``model`` in eval mode returns its experts' own logits [B, E, C] instead of their aggregate."""
    head = model.fc
    head.emit_experts = True
    try:
        yield model
    finally:
        head.emit_experts = False
