"""The registered model: an MLflow pyfunc that answers under any target prior p_t (Eq. 6 / Eq. 17).

A trained run logs ``LadeClassifier`` (models-from-code: the stored model holds ``pyfunc_entry.py``, two lines that
import this module, plus the weights and a JSON card; no pickle). It is self-contained for MLflow's own serving
(``mlflow models serve``, ``build-docker``, stacks that build the environment from the model): lade_core's source
that logged it is bundled (``code_paths``: ``code/lade_core``, first on ``sys.path`` where MLflow loads it into a
fresh process) and ``requirements.txt`` pins the distributions the serving path imports to the versions that
trained it (``serving_requirements``). lade's own loader never runs that code (``load_classifier``).
The card, ``ModelCard``, carries what a caller would otherwise need to know: the network, the source prior, the
loss and its post-hoc rule, class names, the preprocessing (transform family, image size), the BCTS calibration
fitted on the validation split and the lade version that logged it.

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}), params={"target_prior": [...]})

Input: a DataFrame with an ``image`` column of encoded image bytes (PNG / JPEG; base64 strings, as a REST request
carries them, are decoded too), or a float32 array [B, 3, H, W] already preprocessed (``normalize``d).
Params (the signature declares them): ``target_prior`` (C doubles, default uniform), ``posthoc`` (one of the
loss's rules, default its first), ``output`` (``probabilities`` / ``logits`` / ``label``), ``skip_bad``.
Output: a DataFrame with ``label``, ``class_name`` and, per ``output``, ``probabilities`` = p_t(y|x) [C] or the
post-hoc ``logits`` [C]; with ``skip_bad`` an ``error`` column names what failed for rows that did not decode.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lade_core import __version__
from lade_core.data.augment import resolve_normalize
from lade_core.data.transforms import (
    ImageTransform,
    decode_rgb,
    expert_view_transforms,
    normalize,
    transform_batch,
    tta_views,
)
from lade_core.math.heads import check_head_state
from lade_core.math.posthoc import ensemble_views, posthoc_logits
from lade_core.math.priors import uniform_prior, validate_prior
from lade_core.methods import posthoc_rules
from lade_core.models.backbones import LINEAR, build_model, expert_outputs, has_experts, load_model_state, memory_format
from lade_core.models.foundation import Finetuning

OUTPUTS = ("probabilities", "logits", "label")
# Rows one predict call (one REST request) may carry, and rows decoded at a time: what bounds a request's memory,
# with the decoder's pixel cap (transforms.MAX_PIXELS).
MAX_ROWS = int(os.environ.get("LADE_MAX_ROWS_PER_REQUEST", "1024"))
DECODE_CHUNK = 64


class BadInput(MlflowException, ValueError):
    """Bad input to ``predict``: a ValueError in process, and for MLflow's scoring server an MlflowException with
    INVALID_PARAMETER_VALUE, which it answers with HTTP 400 and this message (no stack trace)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
CARD_FILE = "lade_model.json"
WEIGHTS_FILE = "weights.pt"
_ENTRY = Path(__file__).with_name("pyfunc_entry.py")
# The distributions the serving path (this module, the models, the transforms) imports, timm's for timm:NAME models:
# what a fresh environment needs to load the bundled lade_core (a test holds it to what the imports are).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "torchvision", "torchcodec", "pillow", "numpy", "pandas", "pyarrow",
                         "pyyaml", "tqdm")


def serving_requirements(model: str, finetuning: dict | None = None) -> list[str]:
    """``SERVING_DISTRIBUTIONS`` (and timm for a timm model, peft for a LoRA one) pinned to the installed versions:
    what trained it. A local version suffix (torch's ``+cpu``) is dropped, so the serving machine takes its own
    build of it."""
    from importlib.metadata import version

    names = [*SERVING_DISTRIBUTIONS, *(("timm",) if model.startswith("timm:") else ()),
             *(("peft",) if (finetuning or {}).get("peft") == "lora" else ())]
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


@dataclass(frozen=True)
class ModelCard:
    """Everything besides the weights that turns an image into p_t(y|x)."""

    model: str
    num_classes: int
    class_names: list[str]
    source_prior: list[float]
    loss: str
    transform: str
    image_size: int
    calibration: dict | None = None  # label_shift.Calibration.to_dict(): BCTS on the validation split
    head: list | None = None  # [kind, kwargs] of the classifier head (losses.classifier_head); None: linear
    # The lade that trained it: preprocessing and post-hoc rules are lade's code, so a load by another version says
    # so (None: a card written before versions were recorded).
    lade_version: str | None = None
    # {mean, std} the model's inputs were normalized with (augment.resolve_normalize); None: the family's.
    normalize: dict | None = None
    # The post-hoc rules that fit the model's logits, its loss's first (losses.posthoc_rules when logged): a model
    # of a plugin loss serves where the plugin is not installed. None: a card of an older lade (the registry's).
    rules: list[str] | None = None
    # foundation.Finetuning.to_dict(): the backbone's adapters and a text-initialised head's layout, rebuilt before
    # the weights load. None: a plain model (a card of an older lade).
    finetuning: dict | None = None

    @property
    def normalization(self) -> dict:
        return resolve_normalize(self.normalize, self.transform, None)

    @property
    def posthoc_rules(self) -> tuple[str, ...]:
        return tuple(self.rules) if self.rules else posthoc_rules(self.loss)

    @property
    def posthoc(self) -> str:
        return self.posthoc_rules[0]

    @classmethod
    def read(cls, path: str | Path) -> "ModelCard":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "lade-model-card/1":
            raise ValueError(f"{path} is not a lade model card (format {data.get('format')!r})")
        data.pop("format")
        return cls(**data)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "lade-model-card/1", **asdict(self)}))


def signature(card: ModelCard):
    """Params only: the input is either image bytes or a preprocessed float array, which one schema can't say."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    d = param_defaults(card)
    return ModelSignature(inputs=None, params=ParamSchema([
        ParamSpec("target_prior", "double", d["target_prior"], shape=(-1,)),
        ParamSpec("posthoc", "string", d["posthoc"]),
        ParamSpec("output", "string", d["output"]),
        ParamSpec("skip_bad", "boolean", d["skip_bad"]),
    ]))


def param_defaults(card: ModelCard) -> dict:
    """The predict params and their defaults: uniform target prior, the loss's own rule, probabilities."""
    return {"target_prior": [float(x) for x in uniform_prior(card.num_classes)], "posthoc": card.posthoc,
            "output": "probabilities", "skip_bad": False}


def decode_images(values) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Encoded images (bytes, or base64 text) -> uint8 [3, H, W] each (None where it fails) and {row: error}."""
    images, errors = [], {}
    for i, v in enumerate(values):
        try:
            if isinstance(v, str):
                v = base64.b64decode(v, validate=False)
            if not isinstance(v, (bytes, bytearray, memoryview)) or len(v) == 0:
                raise ValueError(f"expected encoded image bytes, got {type(v).__name__}")
            images.append(decode_rgb(bytes(v)))
        except (RuntimeError, ValueError, binascii.Error) as e:
            images.append(None)
            errors[i] = f"image does not decode: {str(e).splitlines()[0][:200]}"
    return images, errors


class LadeClassifier(mlflow.pyfunc.PythonModel):
    """See the module docstring. ``load`` also works without MLflow's loader (tests, benches)."""

    def load_context(self, context) -> None:
        self.load(context.artifacts["card"], context.artifacts["weights"])

    def load(self, card_path: str | Path, weights_path: str | Path) -> "LadeClassifier":
        self.card = ModelCard.read(card_path)
        if self.card.lade_version != __version__:
            print(f"note: this model was logged by lade {self.card.lade_version or '< 0.1.0'}; lade {__version__} "
                  "preprocesses its images and applies its post-hoc rule", file=sys.stderr)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        head = tuple(self.card.head) if self.card.head else LINEAR
        self.net = build_model(self.card.model, self.card.num_classes, head=head,
                               finetuning=Finetuning.from_dict(self.card.finetuning))
        state = torch.load(weights_path, map_location="cpu", weights_only=True)  # shared storage never runs code
        check_head_state(head[0], state)
        load_model_state(self.net, state)
        self.layout = memory_format(self.net)
        self.net.to(self.device, memory_format=self.layout).eval()
        self.source_prior = torch.tensor(self.card.source_prior, dtype=torch.float64)
        return self

    def check_params(self, params: dict | None) -> dict:
        """Params with defaults filled in; a malformed prior or an unknown choice is one clear error."""
        defaults = param_defaults(self.card)
        unknown = sorted(set(params or {}) - set(defaults))
        if unknown:
            raise ValueError(f"unknown params {unknown}; this model takes {list(defaults)}")
        p = {**defaults, **(params or {})}
        rules = self.card.posthoc_rules
        if p["posthoc"] not in rules:
            raise ValueError(f"posthoc {p['posthoc']!r} does not fit a {self.card.loss} model; choose one of "
                             f"{list(rules)}")
        if p["output"] not in OUTPUTS:
            raise ValueError(f"output {p['output']!r}: choose one of {list(OUTPUTS)}")
        p["target_prior"] = validate_prior(p["target_prior"], self.card.num_classes, "target_prior")
        return p

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The network's raw logits [B, C] float32 (CPU) for a model input [B, 3, H, W] (uint8 or normalized)."""
        out = []
        for chunk in x.split(batch_size):
            chunk = chunk.to(self.device)
            if chunk.dtype == torch.uint8:
                chunk = normalize(chunk, self.card.normalization)
            out.append(self.net(chunk.float().contiguous(memory_format=self.layout)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.card.num_classes)

    def preprocess(self, model_input, skip_bad: bool) -> tuple[torch.Tensor, np.ndarray, dict[int, str]]:
        """The model input [B', 3, S, S] of the rows that decode, their row numbers, and {row: error}."""
        if isinstance(model_input, (np.ndarray, torch.Tensor)):
            x = torch.as_tensor(model_input)
            if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
                raise ValueError(f"a preprocessed input must be float [B, 3, H, W]; got {x.dtype} {tuple(x.shape)}")
            return x, np.arange(len(x)), {}
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise ValueError("input must be a DataFrame with an 'image' column of encoded image bytes, or a float "
                             "array [B, 3, H, W]")
        images, errors = decode_images(model_input["image"].tolist())
        if errors and not skip_bad:
            shown = "; ".join(f"row {i}: {e}" for i, e in list(errors.items())[:5])
            raise ValueError(f"{len(errors)} of {len(images)} images do not decode ({shown}); pass skip_bad=True to "
                             "predict the rest")
        ok = np.array([i for i, im in enumerate(images) if im is not None], dtype=np.int64)
        return self.preprocess_images([images[i] for i in ok]), ok, errors

    def tta_logits(self, images: list[torch.Tensor], tta: str) -> torch.Tensor:
        """Decoded uint8 images [3, H, W] -> test-time ensembled logits [B, C] float32 (CPU): the card's transform
        family and size, the views of ``tta`` (``transforms.tta_views``), their softmax averaged
        (``posthoc.ensemble_views``); ``none``: the model's logits on the evaluation view."""
        views = tta_views(images, self.card.transform, self.card.image_size, tta)
        if len(views) == 1:
            return self.logits(views[0])
        return ensemble_views(torch.stack([self.logits(v) for v in views]))

    def preprocess_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 images [3, H, W] -> the model input [B, 3, S, S] (the card's transform and size)."""
        return transform_batch(images, ImageTransform(self.card.transform, self.card.image_size))

    @torch.no_grad()
    def expert_views(self, images: list[torch.Tensor], index: np.ndarray, seed: int = 0) -> torch.Tensor:
        """A multi-expert model's experts' logits [B, 3, E, C] float32 (CPU) on decoded images: on the evaluation
        transform and on test-time aggregation's two augmented views (``transforms.expert_view_transforms``, seeded
        by ``seed`` and each image's ``index``), in the order ``inference.EXPERT_VIEWS`` stores a run's."""
        if not has_experts(self.net):
            raise ValueError(f"test-time aggregation needs a multi-expert model (sade, balpoe); this is a "
                             f"{self.card.loss} model")
        size, family = self.card.image_size, self.card.transform
        if not images:
            return torch.zeros(0, 3, self.net.fc.num_experts, self.card.num_classes)
        tfs = [ImageTransform(family, size), *expert_view_transforms(family, size, [(size, size)], seed)]
        with expert_outputs(self.net):
            return torch.stack([self.logits(transform_batch(images, tf, index)) for tf in tfs], dim=1)

    # ``pd.DataFrame``: one of the hints for which MLflow neither infers a schema nor converts the input, so a float
    # array still arrives as it is (an unhinted predict makes MLflow warn on every load).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            p = self.check_params(params)
            n = len(model_input)
            if n > MAX_ROWS:
                raise ValueError(f"{n} rows in one request; at most {MAX_ROWS} (LADE_MAX_ROWS_PER_REQUEST)")
            # Decoded DECODE_CHUNK rows at a time: memory holds one chunk's pixels, whatever the request's size.
            zs, oks, errors = [], [], {}
            for start in range(0, max(n, 1), DECODE_CHUNK):
                x, ok, bad = self.preprocess(model_input[start:start + DECODE_CHUNK], p["skip_bad"])
                zs.append(self.logits(x).double())
                oks.append(ok + start)
                errors.update({start + i: e for i, e in bad.items()})
        except ValueError as e:  # the caller's input: over REST a 400 with this one line, not a server stack trace
            raise BadInput(str(e)) from None
        z = posthoc_logits(torch.cat(zs), p["posthoc"], self.source_prior, p["target_prior"])  # [B', C]
        return self.frame(z, np.concatenate(oks), errors, n, p["output"])

    def frame(self, z: torch.Tensor, ok: np.ndarray, errors: dict[int, str], n: int, output: str) -> pd.DataFrame:
        """Post-hoc logits [B', C] of rows ``ok`` -> the output DataFrame of all ``n`` rows."""
        label = np.full(n, -1, dtype=np.int64)
        label[ok] = z.argmax(1).numpy()
        names = self.card.class_names
        out = pd.DataFrame({"label": label, "class_name": [names[k] if k >= 0 else None for k in label]})
        if output != "label":
            values = torch.softmax(z, 1) if output == "probabilities" else z
            col: list = [None] * n
            for row, v in zip(ok, values.numpy()):
                col[row] = v.tolist()
            out[output] = col
        if errors:
            out["error"] = [errors.get(i) for i in range(n)]
        return out


def log_classifier(card: ModelCard, state_dict: dict, name: str):
    """Log the pyfunc under the active MLflow run, with lade_core's source bundled; returns its ``ModelInfo``."""
    import shutil
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        code = Path(d) / "lade_core"
        package = Path(__file__).resolve().parents[1]  # the whole of lade_core, not this subpackage
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # No input example on purpose: the input is either image bytes or a float array, and the signature
        # declares the params only; MLflow's reminder would be noise in every run's console.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        card.write(Path(d) / CARD_FILE)
        torch.save(state_dict, Path(d) / WEIGHTS_FILE)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(_ENTRY), signature=signature(card),
            artifacts={"card": str(Path(d) / CARD_FILE), "weights": str(Path(d) / WEIGHTS_FILE)},
            code_paths=[str(code)],
            # Explicit: inferring them would load the model in a subprocess.
            pip_requirements=serving_requirements(card.model, card.finetuning))


# What ``log_classifier`` stores, as its MLmodel file says it (models-from-code): the entry file and two artifacts.
_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
_ARTIFACTS = {"card": f"artifacts/{CARD_FILE}", "weights": f"artifacts/{WEIGHTS_FILE}"}


def _model_file(model_uri: str, path: str) -> str:
    """One file of a logged model, downloaded alone: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/ID/PATH`` or a logged model's own ``models:/<model_id>``."""
    import mlflow.artifacts

    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
    if ref is not None and "/" not in ref and "@" not in ref:  # a logged model id, not a registered name
        base = mlflow.MlflowClient().get_logged_model(ref).artifact_location
    else:
        base = model_uri.rstrip("/")
    return mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{path}")


def check_model_layout(model_uri: str, mlmodel: dict) -> dict:
    """The ``python_function`` flavor of a parsed MLmodel file if it is lade's layout (``log_classifier``), else one
    error naming what differs. Only data is read: nothing the model stores is imported or unpickled."""
    flavor = (mlmodel.get("flavors") or {}).get("python_function") if isinstance(mlmodel, dict) else None
    if not isinstance(flavor, dict):
        raise ValueError(f"{model_uri} is not a lade model: it has no python_function flavor")
    if "python_model" in flavor or flavor.get("loader_module") != _CODE_LOADER:
        kind = "a pickled python model" if "python_model" in flavor else f"loader {flavor.get('loader_module')!r}"
        raise ValueError(f"{model_uri} is not a lade model: it was logged by another tool ({kind})")
    entry = Path(str(flavor.get("model_code_path", ""))).name
    artifacts = {k: (v or {}).get("path") for k, v in (flavor.get("artifacts") or {}).items()}
    if entry != _ENTRY.name or artifacts != _ARTIFACTS:
        raise ValueError(f"{model_uri} is not a lade model: its code file is {entry!r} and its artifacts {artifacts}; "
                         f"lade logs {_ENTRY.name!r} with {_ARTIFACTS}")
    return flavor


def check_alias_classes(tracking_uri: str, name: str, alias: str, class_names: list[str]) -> None:
    """Refuse to move ``models:/NAME@ALIAS`` to a model of other classes: whatever serves the alias would answer
    with another label set. Nothing to check while the alias is unset."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return
    uri = f"models:/{name}/{version.version}"
    try:
        card = ModelCard.read(_model_file(uri, _ARTIFACTS["card"]))
    except (MlflowException, OSError, ValueError, TypeError):
        return  # not a lade model: nothing lade serves under it
    if list(card.class_names) != list(class_names):
        raise ValueError(f"models:/{name}@{alias} is version {version.version}, a model of {card.num_classes} other "
                         f"classes (e.g. {card.class_names[:3]}); this dataset has {len(class_names)} "
                         f"(e.g. {class_names[:3]}): register under another name")


def load_classifier(model_uri: str, tracking_uri: str | None = None) -> LadeClassifier:
    """The ``LadeClassifier`` behind a logged model (``models:/NAME@ALIAS``, ``runs:/...``) of the store at
    ``tracking_uri`` (default: MLflow's current one), built by the installed lade from the model's card and weights
    alone.

    The registry and the artifact store are a trust boundary: whoever can write to them could replace the stored
    code. So this never calls ``mlflow.pyfunc.load_model`` (which runs the stored ``pyfunc_entry.py``, or unpickles a
    foreign model): it reads the MLmodel file as YAML, refuses anything that is not lade's layout, and downloads
    only the JSON card and the weights (``weights_only=True``). MLflow's own serving (``mlflow models serve``) does
    run the stored entry, which a user who serves that way has chosen."""
    import yaml

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        mlmodel = yaml.safe_load(Path(_model_file(model_uri, "MLmodel")).read_text())
        check_model_layout(model_uri, mlmodel)
        card, weights = (_model_file(model_uri, path) for path in _ARTIFACTS.values())
    except MlflowException as e:  # an unknown name, version or run, an unset alias, a missing file
        raise ValueError(f"cannot load {model_uri}: {e.message}") from e
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot load {model_uri}: {e}") from e
    try:
        return LadeClassifier().load(card, weights)
    except (TypeError, KeyError, RuntimeError) as e:  # a card with other fields, weights of another network
        raise ValueError(f"{model_uri}: its card or weights do not make a lade model ({e})") from e
