"""Model factories: CIFAR ResNet-32 and torchvision ResNet-50 / ResNeXt-50 32x4d / ResNet-152, with the classifier
head ``fc`` the loss trains (``lade_core.heads``; linear unless the loss says otherwise, ``losses.classifier_head``).

No weights are downloaded: ``weights_path`` optionally loads a local state dict (e.g. an ImageNet checkpoint).
Constructors never move to a device; the training loop does (Ray Train's ``prepare_model``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .heads import build_head

Head = tuple[str, dict]  # (kind in heads.HEADS, its keyword arguments)
LINEAR: Head = ("linear", {})


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


class CifarResNet(nn.Module):
    """The standard 3-stage CIFAR ResNet (He et al. 2016): depth = 6n + 2, widths 16/32/64."""

    def __init__(self, depth: int = 32, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 3, H, W] -> logits [B, C]
        h = self.features(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet32": lambda num_classes: CifarResNet(32, num_classes),
    "resnet50": _torchvision("resnet50"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d"),
    "resnet152": _torchvision("resnet152"),
}


def _with_head(model: nn.Module, num_classes: int, head: Head) -> nn.Module:
    kind, kwargs = head
    if kind != "linear":
        model.fc = build_head(kind, model.fc.in_features, num_classes, **kwargs)
    return model


def build_model(name: str, num_classes: int, weights_path: str | None = None, head: Head = LINEAR) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = _with_head(MODELS[name](num_classes), num_classes, head)
    if weights_path:
        path = Path(weights_path)
        if not path.exists():
            raise FileNotFoundError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
        own = model.state_dict()
        # A backbone checkpoint's classifier (another class count or another head) is not loaded.
        skip = {k for k in state if k.startswith("fc.") and (k not in own or state[k].shape != own[k].shape)}
        state = {k: v for k, v in state.items() if k not in skip}
        unexpected = sorted(set(state) - set(own))
        # Every backbone weight must come from the file: a partial match would train the rest from scratch silently.
        missing = sorted(k for k in set(own) - set(state) if not k.startswith("fc."))
        shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
        if unexpected or missing or shapes:
            raise ValueError(f"{path} does not match model {name}: " + "; ".join(
                part for part in (f"keys not in the model {unexpected[:5]}" if unexpected else "",
                                  f"backbone keys missing from the file {missing[:5]}" if missing else "",
                                  f"other shapes: {shapes[:3]}" if shapes else "") if part))
        model.load_state_dict(state, strict=False)
    return model


def check_input_size(name: str, num_classes: int, image_size: int, batch_size: int, head: Head = LINEAR) -> None:
    """Raise ValueError if the model cannot train on [batch_size, 3, image_size, image_size] inputs (a feature map
    pooled away, BatchNorm with one value per channel). Shapes only: the forward runs on the meta device, so it
    costs no compute and no memory, on the driver, before any worker starts."""
    with torch.device("meta"):
        model = _with_head(MODELS[name](num_classes), num_classes, head).train()
        try:
            out = model(torch.empty(batch_size, 3, image_size, image_size))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"model {name} cannot train on {image_size}x{image_size} images in batches of {batch_size} "
                             f"per worker ({e}); use a larger image_size or batch_size") from None
    if tuple(out.shape) != (batch_size, num_classes):
        raise ValueError(f"model {name} maps {image_size}x{image_size} images to {tuple(out.shape)}, not "
                         f"[{batch_size}, {num_classes}] logits")


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The final linear layer's parameters (for a separate classifier learning rate)."""
    return list(model.fc.parameters())
