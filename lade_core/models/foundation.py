"""Pretrained vision(-language) backbones fine-tuned lightly, the way LIFT (Shi et al., ICML 2024) fine-tunes CLIP
for long-tailed recognition: parameter-efficient adapters in a frozen ViT, a cosine classifier initialised from
the text tower's embeddings of the class names, and pretrained weights from a local file.

- ``peft`` (``Finetuning.peft``): ``adaptformer`` (Chen et al. 2022, LIFT's choice: beside each block's MLP a
  bottleneck LN -> down -> ReLU -> up, scaled by a learned s, added to the block's MLP output; the up-projection
  starts at zero, so the adapted model starts as the frozen one, exactly), ``lora`` (Hu et al. 2022, through the
  ``peft`` library on the attention's qkv projection: W + (alpha / r) B A with B = 0 at init), ``linear`` (the
  backbone frozen and run in eval mode: a linear probe) or ``none`` (full fine-tuning).
- ``text_init``: the classifier is a cosine classifier s * cos(w_c, f) (LIFT: s = 25) over the backbone's CLIP
  image embedding (its image projection kept), its w_c the text tower's embedding of "a photo of a {class}."
  (open_clip: ``pip install 'lade[clip]'``), so the untrained model is CLIP's zero-shot classifier.
- ``pretrained_file``: a local copy of the model's published weights (timm: ``pretrained_cfg_overlay=dict(file=)``,
  which converts an open_clip checkpoint's image tower too; the text tower from the same Hugging Face repository
  folder, ``open_clip_config.json`` beside it).

The backbone, its adapters and the head are one ``nn.Module`` (``models.Backbone``); what ``build_model`` needs to
rebuild it without any pretrained file (the adapters' layout, the projection's width) is a ``Finetuning``, which
the model card stores.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PEFT_METHODS = ("none", "adaptformer", "lora", "linear")
# LIFT's cosine classifier scale (its configs: ``scale: 25``).
TEXT_HEAD_SCALE = 25.0
# LIFT's prompt (its ``templates``: one, CLIP's own).
PROMPT = "a photo of a {}."
OPEN_CLIP_CONFIG = "open_clip_config.json"  # the text tower's config in a model's Hugging Face repository


@dataclass(frozen=True)
class Finetuning:
    """What a fine-tuned backbone adds to its architecture, resolved for one model: the card stores it, so the
    registered model, the pyfunc and the Serve app rebuild the same modules before loading the weights."""

    peft: str = "none"
    rank: int | None = None  # adaptformer's bottleneck width, LoRA's rank; None where peft has none
    projection: int | None = None  # text_init: the CLIP image embedding's width (the backbone keeps its projection)
    scale: float | None = None  # text_init: the cosine classifier's s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Finetuning:
        return cls(**(data or {}))


def check_peft(value) -> str:
    if value not in PEFT_METHODS:
        raise ValueError(f"must be one of {list(PEFT_METHODS)}, got {value!r}")
    return value


# --- Where the adapters go --------------------------------------------------------------------------------

def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm ViT (``blocks[i]`` with ``norm2``, ``mlp``, ``attn.qkv``) or a torchvision
    ViT (``encoder.layers[i]`` with ``ln_2``, ``mlp``, ``self_attention``); [] for anything else."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None and hasattr(backbone, "encoder"):
        blocks = getattr(backbone.encoder, "layers", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        return []
    return [b for b in blocks if isinstance(getattr(b, "mlp", None), nn.Module)
            and (isinstance(getattr(b, "norm2", None), nn.Module) or isinstance(getattr(b, "ln_2", None), nn.Module))]


def _width(block: nn.Module) -> int:
    norm = getattr(block, "norm2", None) or block.ln_2
    return int(norm.normalized_shape[0])


def default_rank(peft: str, num_classes: int, depth: int) -> int | None:
    """LIFT's adapter width rule, 2^floor(log2(C / (2 L))) for C classes and L blocks (C / 24 for a ViT-B's 12:
    4 for CIFAR-100, 8 for Places-LT, 32 for ImageNet-LT), at least 1; LoRA's common r = 8."""
    if peft == "adaptformer":
        return 2 ** max(0, int(math.floor(math.log2(max(num_classes / (2 * max(depth, 1)), 1)))))
    if peft == "lora":
        return 8
    return None


class AdaptFormer(nn.Module):
    """The adapter of AdaptFormer as LIFT writes it: x [B, N, D] -> s * up(relu(down(LN(x)))) [B, N, D]; ``up``
    starts at zero (the adapter adds nothing until it learns), s is learned, starting at 1."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up_proj(F.relu(self.down_proj(self.ln(x))))


class ParallelAdapter(nn.Module):
    """A block's ``norm -> mlp`` with an adapter beside it on the same input (the residual stream before the
    norm): mlp(norm(x)) + adapter(x). It takes the block's ``mlp`` slot and its norm slot becomes Identity, so
    the block's own forward (x + mlp(norm(x)), with its layer scale and drop path) runs unchanged."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: nn.Module):
        super().__init__()
        self.norm, self.mlp, self.adapter = norm, mlp, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.adapter(x)


def add_adaptformer(blocks: list[nn.Module], bottleneck: int) -> None:
    for block in blocks:
        norm_name = "norm2" if hasattr(block, "norm2") else "ln_2"
        adapter = ParallelAdapter(getattr(block, norm_name), block.mlp, AdaptFormer(_width(block), bottleneck))
        setattr(block, norm_name, nn.Identity())
        block.mlp = adapter


def add_lora(backbone: nn.Module, rank: int) -> None:
    """LoRA on every block's qkv projection (timm: ``attn.qkv``, a Linear; torchvision: ``self_attention``, an
    nn.MultiheadAttention) through ``peft``; alpha = r, so the update is B A at scale 1."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError("peft lora needs the peft library: pip install 'lade[peft]'") from None
    target = r".*attn\.qkv" if hasattr(backbone, "blocks") else r".*self_attention"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=target, lora_dropout=0.0), backbone)


def apply_peft(backbone: nn.Module, finetuning: Finetuning, model_name: str) -> None:
    """Add ``finetuning``'s adapters to ``backbone`` and leave only them trainable (all of it trainable for
    ``none``; nothing for ``linear``). The caller's head stays trainable."""
    peft = finetuning.peft
    if peft == "none":
        return
    blocks = transformer_blocks(backbone)
    if peft in ("adaptformer", "lora") and not blocks:
        raise ValueError(f"peft {peft} adapts the transformer blocks of a timm or torchvision ViT (blocks with an "
                         f"MLP and attention); model {model_name} has none: use peft linear or none")
    for p in backbone.parameters():
        p.requires_grad_(False)
    if peft == "adaptformer":
        add_adaptformer(blocks, finetuning.rank)
    elif peft == "lora":
        add_lora(backbone, finetuning.rank)
    for name, p in backbone.named_parameters():
        if ".adapter." in f".{name}" or "lora_" in name:
            p.requires_grad_(True)


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model`` (its head included)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# --- The text tower (open_clip) -----------------------------------------------------------------------------

def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ValueError("text_init needs open_clip for the CLIP text tower: pip install 'lade[clip]'") from None
    return open_clip


def text_tower_source(model_name: str, pretrained: str | None, pretrained_file: str | None) -> str:
    """Where the CLIP text tower matching a timm CLIP image tower comes from, as open_clip names it: the folder of
    ``pretrained_file`` (its Hugging Face repository's layout: ``open_clip_config.json`` beside the weights) as
    ``local-dir:``, else the Hugging Face repository of the timm pretrained tag (``hf-hub:timm/...``, which holds
    the open_clip model too). One clear error where there is none."""
    if pretrained_file:
        folder = Path(pretrained_file).resolve()
        folder = folder if folder.is_dir() else folder.parent
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise ValueError(f"text_init: no CLIP text tower beside the pretrained file: {folder / OPEN_CLIP_CONFIG} "
                             "is missing (download the model's Hugging Face repository folder, e.g. "
                             "timm/vit_base_patch16_clip_224.openai, which holds it)")
        return f"local-dir:{folder}"
    if not model_name.startswith("timm:") or pretrained is None:
        raise ValueError(f"text_init needs a CLIP model's text tower: a timm CLIP model with its pretrained tag (e.g. "
                         f"timm:vit_base_patch16_clip_224 --pretrained openai) or --pretrained-file; model "
                         f"{model_name} with pretrained {pretrained!r} has none")
    import timm

    arch = model_name[len("timm:"):]
    cfg = timm.models.get_pretrained_cfg(arch if pretrained == "DEFAULT" else f"{arch}.{pretrained}")
    hub = (cfg.hf_hub_id or "") if cfg is not None else ""
    if hub == "timm/":  # timm's shorthand: the repository named after the tagged model
        hub = f"timm/{arch}.{cfg.tag}"
    if "clip" not in arch or not hub:
        raise ValueError(f"text_init needs a CLIP model's text tower; {model_name} ({pretrained}) is not a CLIP "
                         "image tower with a Hugging Face repository (e.g. timm:vit_base_patch16_clip_224 --pretrained "
                         "openai)")
    return f"hf-hub:{hub}"


@lru_cache(maxsize=16)
def text_embedding_dim(source: str) -> int:
    """The CLIP joint embedding's width from the text tower's config (no weights read; once per process: the
    driver's checks, its finalization and a search's trials each ask)."""
    schema, _, where = source.partition(":")
    if schema == "local-dir":
        config = json.loads((Path(where) / OPEN_CLIP_CONFIG).read_text())
    else:
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(where, OPEN_CLIP_CONFIG)).read_text())
    return int(config.get("model_cfg", config)["embed_dim"])


@torch.no_grad()
def class_text_embeddings(source: str, class_names: list[str], batch_size: int = 256) -> torch.Tensor:
    """The text tower's normalized embeddings of ``PROMPT`` for each class name: [C, D] float32."""
    open_clip = _open_clip()
    model = open_clip.create_model(source).eval()
    tokenizer = open_clip.get_tokenizer(source)
    prompts = [PROMPT.format(name.replace("_", " ")) for name in class_names]
    out = [model.encode_text(tokenizer(prompts[i:i + batch_size]), normalize=True).float()
           for i in range(0, len(prompts), batch_size)]
    return torch.cat(out)


def init_head_from_text(head: nn.Module, embeddings: torch.Tensor) -> None:
    """A cosine head's class weights <- the class text embeddings [C, D] (every expert's, for a multi-expert head);
    a bias, where the head has one, <- 0."""
    with torch.no_grad():
        w = head.weight
        w.copy_(embeddings.to(w.dtype).expand_as(w))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def cosine_head(head: tuple[str, dict], scale: float) -> tuple[str, dict]:
    """The head ``head`` (a loss's, ``losses.classifier_head``) as a cosine classifier over the text embeddings'
    space, the loss's inference behaviour kept: a linear or logit-adjusted head becomes ``cosine_linear`` (s *
    cos, with the adjusted head's eval offset), experts become cosine experts; LDAM's and Causal Norm's heads are
    normalized already and stay as they are."""
    kind, kwargs = head
    if kind in ("linear", "adjusted_linear"):
        return "cosine_linear", {**({"eval_offset": kwargs["eval_offset"]} if "eval_offset" in kwargs else {}),
                                 "scale": scale}
    if kind == "experts":
        return kind, {**kwargs, "scale": scale}
    return head
