"""The contract between training and evaluation: what a finished run stores, and how it is written and read back.

A run trained by ``pipelines/train.py`` (or the champion of ``pipelines/tune.py``) holds, in MLflow:
  - ``data/source_prior.json``: {"source_prior": p_s [C], "train_counts": [C]} (written when the run starts);
  - ``eval/test_logits.parquet``: the test split's logits [N, C] float32 and labels [N], in test-split order;
  - ``eval/val_logits.parquet``: the same for the validation split (calibration, BBSE's confusion matrix);
  - for a multi-expert model (``heads.ExpertHeads``), ``eval/test_expert_views.parquet`` and
    ``eval/val_expert_views.parquet``: each expert's logits [N, 3, E, C] on the evaluation transform and on two
    augmented views of every image (``inference.EXPERT_VIEWS``), with the head's ``eval_offset`` [C]: what
    test-time aggregation learns its weights from (``aggregation.learn_expert_weights``);
  - ``checkpoint/state_dict.pt``: the final model's state dict (loads with ``weights_only=True``);
  - the logged model ``model`` (an MLflow pyfunc, ``lade_core.tracking.model``), optionally registered;
  - params (the resolved config) and metrics (``train/*``, ``val/*``, ``lr`` per epoch; ``test/*`` once).
Evaluation (``pipelines/evaluate.py``, ``compare.py``) reads only these, through ``load_run_logits``; ``evaluate.py``
writes back ``shift/<target>/<rule>/<metric>`` (``shift_metrics``), ``eval/shift_table.json`` and
``eval/figures/*.png``, and with an estimate ``estimate/<method>-<posteriors>/<target>/<metric>`` and its table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lade_core.math.checks import check_labels
from lade_core.math.posthoc import RULES
from lade_core.methods import tuned_rules

LOGITS_ARTIFACT = "eval/test_logits.parquet"
VAL_LOGITS_ARTIFACT = "eval/val_logits.parquet"
PRIOR_ARTIFACT = "data/source_prior.json"
VIEWS_ARTIFACT = "eval/test_expert_views.parquet"
VAL_VIEWS_ARTIFACT = "eval/val_expert_views.parquet"
STATE_DICT_ARTIFACT = "checkpoint/state_dict.pt"
MODEL_NAME = "model"  # the run's logged model (pyfunc: lade_core.tracking.model.LadeClassifier)
SHIFT_TABLE_ARTIFACT = "eval/shift_table.json"


def tta_logits_artifact(tta: str) -> str:
    """The run's test logits ensembled over the views of ``tta`` (``evaluate.py --tta``), beside its plain ones."""
    return f"eval/test_logits_tta_{tta}.parquet"


def tta_table_artifact(tta: str) -> str:
    return f"eval/shift_table_tta_{tta}.json"
AGGREGATE_WEIGHTS_ARTIFACT = "eval/aggregate_weights.json"  # evaluate.py --aggregate: the weights per target
FIGURES_DIR = "eval/figures"
ESTIMATE_METRICS = ("top1_estimated", "ratio", "tv", "kl")


def write_source_info(path: str | Path, source_prior, train_counts) -> None:
    Path(path).write_text(json.dumps({"source_prior": [float(x) for x in source_prior],
                                      "train_counts": [int(x) for x in train_counts]}))


def read_source_info(path: str | Path) -> tuple[torch.Tensor, list[int]]:
    """A run's ``data/source_prior.json``: the source prior float64 [C] and the training class counts."""
    info = json.loads(Path(path).read_text())
    return torch.tensor(info["source_prior"], dtype=torch.float64), list(info["train_counts"])


def write_logits_parquet(path: str | Path, logits: torch.Tensor, labels: torch.Tensor,
                         metadata: dict[str, str] | None = None) -> None:
    """Test logits [N, C] float32 as a fixed-size-list column plus int64 labels; ``metadata``: the schema's
    key-value metadata (strings: JSON, never code)."""
    n, c = logits.shape
    flat = pa.array(logits.float().numpy().reshape(-1), pa.float32())
    table = pa.table({"label": pa.array(labels.numpy().astype(np.int64)),
                      "logits": pa.FixedSizeListArray.from_arrays(flat, c)})
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, str(path))


def _read_logits_table(path: str | Path, filesystem=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits [N, C] float32, labels [N], schema metadata) of a file ``write_logits_parquet`` wrote."""
    table = pq.read_table(str(path), filesystem=filesystem)
    col = table.column("logits").combine_chunks()
    c = col.type.list_size
    logits = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(-1, c).copy())
    return logits, torch.from_numpy(table.column("label").to_numpy().copy()), table.schema.metadata or {}


def read_logits_parquet(path: str | Path, filesystem=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32, labels [N]) of a file ``write_logits_parquet`` wrote; ``filesystem``: a pyarrow
    filesystem ``path`` lies in (a checkpoint's on remote storage), else a local path."""
    return _read_logits_table(path, filesystem)[:2]


class ExpertViews(NamedTuple):
    """A multi-expert model's outputs on one split: expert logits [N, V, E, C] (V = ``inference.EXPERT_VIEWS``:
    clean, view a, view b), labels [N] and the head's ``eval_offset`` [C] (its inference logits are
    sum_e w_e z_e + eval_offset)."""

    logits: torch.Tensor
    labels: torch.Tensor
    eval_offset: torch.Tensor


def write_expert_views_parquet(path: str | Path, views: ExpertViews) -> None:
    """``views`` as ``write_logits_parquet`` writes logits (one fixed-size list of V·E·C float32 per image), its
    shape and ``eval_offset`` in the schema's metadata."""
    n, v, e, c = views.logits.shape
    write_logits_parquet(path, views.logits.reshape(n, v * e * c), views.labels,
                         {"lade.views_shape": json.dumps([v, e, c]),
                          "lade.eval_offset": json.dumps([float(x) for x in views.eval_offset])})


def read_expert_views_parquet(path: str | Path, filesystem=None) -> ExpertViews:
    """What ``write_expert_views_parquet`` wrote; a file without its metadata is refused by name."""
    logits, labels, meta = _read_logits_table(path, filesystem)
    if b"lade.views_shape" not in meta or b"lade.eval_offset" not in meta:
        raise ValueError(f"{path} is not an expert-views file: its schema has no lade.views_shape / lade.eval_offset")
    shape = json.loads(meta[b"lade.views_shape"])
    offset = torch.tensor(json.loads(meta[b"lade.eval_offset"]), dtype=torch.float32)
    return ExpertViews(logits.reshape(-1, *shape), labels, offset)


# --- Reading a finished run back (evaluation, comparison, tuning) ----------------------------------------------

@dataclass(frozen=True)
class RunLogits:
    """What evaluation needs from a training run: test logits [N, C], labels [N], p_s [C], train counts, loss;
    the validation logits [M, C] and labels [M] where the run stored them (prior estimation)."""

    run_id: str
    run_name: str
    loss: str
    logits: torch.Tensor
    labels: torch.Tensor
    source_prior: torch.Tensor
    train_counts: list[int]
    val_logits: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    # The linear classifier's weight [C, D] and bias [C] of a run whose loss takes PC compensation (softmax, focal),
    # for the τ-normalized classifier evaluated from its stored logits (``heads.tau_normalize``); else None.
    classifier: tuple[torch.Tensor, torch.Tensor | None] | None = None
    # The digest of the run's config without its seed (tracking.SEED_GROUP_TAG): runs sharing it differ only in
    # seed, and compare.py reports them as one mean ± std row. None: a run of an older lade (its own group).
    seed_group: str | None = None
    # A multi-expert run's test-split expert logits on the clean image and two augmented views, loaded on request
    # (``load_run_logits(expert_views=True)``) for test-time aggregation; else None.
    expert_views: ExpertViews | None = None

    def __post_init__(self):
        """Whatever the logits came from (an MLflow run, a local file), they are checked before any metric."""
        from lade_core.math.priors import validate_prior

        if self.logits.ndim != 2 or self.logits.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.run_name}: logits must be [N, C] with one label per row; got logits "
                             f"{tuple(self.logits.shape)} and {tuple(self.labels.shape)} labels")
        n, c = self.logits.shape
        bad = (~torch.isfinite(self.logits)).any(dim=1).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"{self.run_name}: logits are NaN or infinite in {bad.numel()} rows, e.g. "
                             f"{bad[:10].tolist()}")
        check_labels(self.labels, c, f"{self.run_name}: labels")
        validate_prior(self.source_prior, c, "source prior")
        if len(self.train_counts) != c:
            raise ValueError(f"{self.run_name}: train_counts has {len(self.train_counts)} entries for {c} classes")
        ev = self.expert_views
        if ev is not None and (ev.logits.dim() != 4 or ev.logits.shape[0] != n or ev.logits.shape[3] != c
                               or not torch.equal(ev.labels, self.labels)):
            raise ValueError(f"{self.run_name}: the expert views {tuple(ev.logits.shape)} do not match the test "
                             f"logits {(n, c)} and their labels")


def run_for_model(client, model_uri: str) -> str:
    """The training run behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/") or model_uri.count("/") not in (1, 2):
        raise ValueError(f"model must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    ref = model_uri[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(f"{model_uri!r} names no alias or version: use models:/{ref}@ALIAS or "
                             f"models:/{ref}/VERSION")
    except MlflowException as e:
        raise ValueError(f"unknown model {model_uri!r}: {e.message}") from e
    if not version.run_id:
        raise ValueError(f"{model_uri} (version {version.version}) is not linked to a training run")
    return version.run_id


def missing_views_message(run: RunLogits) -> str:
    """The error of test-time aggregation asked of a run that stored no expert views."""
    return (f"run {run.run_id} ({run.run_name}, loss {run.loss}) has no {VIEWS_ARTIFACT}: test-time aggregation "
            "needs a multi-expert model (--loss sade or balpoe) trained by this lade")


def load_run_logits(client, run_id: str, classifier: bool = False, expert_views: bool = False) -> RunLogits:
    """Download the run's test logits and source prior; errors name what is missing. ``classifier``: also its
    linear classifier's weights (a state-dict download) where its loss takes PC, for τ-norm. ``expert_views``: also
    the test split's expert views (``VIEWS_ARTIFACT``) where the run stored them (a multi-expert model), else None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"unknown run id {run_id!r} in {client.tracking_uri}") from e
    have = {a.path for d in (Path(LOGITS_ARTIFACT).parent, Path(PRIOR_ARTIFACT).parent)
            for a in client.list_artifacts(run_id, str(d))}
    for needed in (LOGITS_ARTIFACT, PRIOR_ARTIFACT):
        if needed not in have:
            raise ValueError(f"run {run_id} ({run.info.run_name}) has no {needed} artifact: only runs trained to the "
                             "end by pipelines/train.py store test logits")
    logits, labels = read_logits_parquet(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=LOGITS_ARTIFACT, tracking_uri=client.tracking_uri))
    source_prior, train_counts = read_source_info(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=PRIOR_ARTIFACT, tracking_uri=client.tracking_uri))
    val = (read_logits_parquet(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=VAL_LOGITS_ARTIFACT, tracking_uri=client.tracking_uri))
        if VAL_LOGITS_ARTIFACT in have else (None, None))
    loss = run.data.params.get("loss", "lade")
    views = (read_expert_views_parquet(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=VIEWS_ARTIFACT, tracking_uri=client.tracking_uri))
        if expert_views and VIEWS_ARTIFACT in have else None)
    # The linear classifier only where a rule tuned on validation needs it (τ-norm of an entangled model).
    wanted = classifier and any(RULES[r].needs_classifier for r in tuned_rules(loss, has_classifier=True))
    return RunLogits(run_id, run.info.run_name, loss, logits, labels, source_prior, train_counts, *val,
                     classifier=_linear_classifier(client, run_id) if wanted else None,
                     seed_group=run.data.tags.get("lade.seed_group"), expert_views=views)


def _linear_classifier(client, run_id: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [C, D], bias [C]) of the run's stored model if its classifier is a plain linear layer, else None."""
    import mlflow

    stored = {a.path for a in client.list_artifacts(run_id, str(Path(STATE_DICT_ARTIFACT).parent))}
    if STATE_DICT_ARTIFACT not in stored:
        return None
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=STATE_DICT_ARTIFACT,
                                                           tracking_uri=client.tracking_uri),
                       map_location="cpu", weights_only=True)  # shared storage never runs code
    if set(k for k in state if k.startswith("fc.")) - {"fc.weight", "fc.bias"}:
        return None
    return state["fc.weight"].double(), state["fc.bias"].double() if "fc.bias" in state else None


def shift_metrics(rows: list[dict], metrics: tuple[str, ...]) -> dict[str, float]:
    """``evaluate_targets``' rows as the run's metrics ``shift/<target>/<rule>/<metric>``."""
    return {f"shift/{r['target']}/{r['mode']}/{m}": r[m] for r in rows for m in metrics}


def estimate_name(method: str, calibrated: bool) -> str:
    """The name a prior estimate is stored under: estimates with and without BCTS are different quantities, and a
    name is logged once."""
    return f"{method}-{'bcts' if calibrated else 'raw'}"


def estimate_metrics(rows: list[dict], name: str) -> dict[str, float]:
    """``estimated_prior_rows`` as the run's metrics ``estimate/<name>/<target>/<metric>``."""
    return {f"estimate/{name}/{r['target']}/{m}": r[m] for r in rows for m in ESTIMATE_METRICS}


def read_local_run(logits_file: str | Path, source_info: str | Path, loss: str) -> RunLogits:
    """A run's logits from local files (a downloaded ``eval/test_logits.parquet`` and ``data/source_prior.json``)."""
    path = Path(logits_file)
    if not path.is_file():
        raise FileNotFoundError(f"logits file {path} does not exist")
    logits, labels = read_logits_parquet(path)
    return RunLogits("", path.stem, loss, logits, labels, *read_source_info(source_info))


def runs_with_logits(client, run_ids: list[str] | None = None, experiment: str | None = None,
                     model: str | None = None) -> list[str]:
    """The runs to compare: ``run_ids`` as given, every version's run of registered ``model`` (in version order),
    or every run of ``experiment`` that stored test logits (search parents and the like are left out)."""
    if run_ids:
        return list(run_ids)
    if model:
        versions = client.search_model_versions(f"name = '{model}'")
        if not versions:
            raise ValueError(f"no registered model named {model!r}")
        return list(dict.fromkeys(v.run_id for v in sorted(versions, key=lambda v: int(v.version)) if v.run_id))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment named {experiment!r}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000)
    folder = str(Path(LOGITS_ARTIFACT).parent)
    ids = [r.info.run_id for r in runs
           if LOGITS_ARTIFACT in {a.path for a in client.list_artifacts(r.info.run_id, folder)}]
    if not ids:
        raise ValueError(f"experiment {experiment!r} has no run with test logits ({LOGITS_ARTIFACT})")
    return ids

