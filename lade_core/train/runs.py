"""The two ends of a training run that every entry point shares: open (or generate) its dataset, and finalize it
(test logits, metrics, model) into MLflow. ``pipelines/train.py`` and ``pipelines/tune.py`` both call these."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from lade_core import __version__
from lade_core.config.context import RunContext
from lade_core.config.schema import TrainConfig, check_runnable, model_finetuning
from lade_core.data import PreparedDataset, decode_place, open_prepared
from lade_core.data.augment import resolve_augment, resolve_normalize
from lade_core.data.prepare import prepare_dataset, summary_line
from lade_core.data.synthetic import make_synthetic
from lade_core.math.evaluation import evaluate_targets, protocol_targets
from lade_core.math.label_shift import auto_calibration, source_logits
from lade_core.methods import default_rule, posthoc_rules
from lade_core.models.backbones import (
    build_model,
    check_input_size,
    load_model_state,
    parameter_counts,
    transformer_depth,
)
from lade_core.models.foundation import default_rank
from lade_core.report.tables import format_table
from lade_core.serve.inference import batch_logits, sharded_expert_views
from lade_core.tracking.artifacts import (
    LOGITS_ARTIFACT,
    MODEL_NAME,
    STATE_DICT_ARTIFACT,
    VAL_LOGITS_ARTIFACT,
    VAL_VIEWS_ARTIFACT,
    VIEWS_ARTIFACT,
    read_logits_parquet,
    write_expert_views_parquet,
    write_logits_parquet,
)
from lade_core.tracking.model import ModelCard, log_classifier
from lade_core.tracking.store import (
    EpochLogger,
    active_run,
    download_artifact,
    end_run,
    log_metrics_once,
    logged_model_uri,
    mlflow_client,
    register_once,
    wait_reachable,
)
from lade_core.train.checkpoint import final_expert_views, final_logits, load_checkpoint, saved_history
from lade_core.train.loop import build_criterion

# --smoke-test: a tiny generated dataset (class-sorted, like real data) and one epoch.
SMOKE = {"dataset": "data/synthetic_smoke", "epochs": 1, "batch_size": 32, "num_workers": 2,
         "synthetic": {"num_classes": 4, "image_size": 16, "max_count": 40, "imbalance_ratio": 4,
                       "test_per_class": 20, "seed": 0}}
def load_dataset(config: TrainConfig) -> tuple[TrainConfig, PreparedDataset]:
    """The config's prepared dataset, generated first from its ``synthetic`` options if it is absent (in this
    process: no Ray); returns the config with the dataset's absolute path (what the workers open and the run
    records) and the dataset."""
    path = Path(config.data.dataset)
    path = path if path.is_absolute() else (Path.cwd() / path)
    if not (path / "dataset.json").exists() and config.data.synthetic:
        print(summary_line(prepare_dataset(make_synthetic(**config.data.synthetic), path)))
    return config.replace(dataset=str(path.resolve())), open_prepared(path)


def check_against_dataset(config: TrainConfig, prepared: PreparedDataset) -> TrainConfig:
    """The checks that need the opened dataset, before Ray starts any worker: the config against its classes, a
    validation split to select on (never test), and the model against the input size it will get. Returns the
    config as the run records it: the loss's defaults filled in, the augmentation and normalization resolved."""
    check_runnable(config, prepared.num_classes)
    config = config.with_loss_defaults()
    prepared.check_validation_split()
    # The loss and its head built here, so a bad hyperparameter fails now, not in every worker.
    head = build_criterion(config, prepared.source_prior, prepared.class_counts("train")).head
    crop = prepared.crop_size(config.data.image_size)
    model = config.model
    if model.peft in ("adaptformer", "lora") and model.peft_rank is None:  # the run records the rank it uses
        config = config.replace(peft_rank=default_rank(model.peft, prepared.num_classes,
                                                       transformer_depth(model.model)))
        model = config.model
    if model.text_init and not prepared.manifest.get("class_names"):
        raise ValueError(f"text_init initialises the classifier from the class names, and dataset {prepared.root} has "
                         "none (its dataset.json lists no class_names): prepare it from a source with class names "
                         "(an ImageFolder's folders, a classes file)")
    finetuning = model_finetuning(model)
    check_input_size(model.model, prepared.num_classes, crop, config.optimizer.batch_size // config.runtime.num_workers,
                     head, finetuning)
    # The augmentation the run records (checkpoint, MLflow params, config digest): the resolved lists, not presets.
    config = config.replace(
        augment=resolve_augment(config.augment.augment, prepared.family, crop, prepared.input_sizes(crop)),
        normalize=resolve_normalize(config.augment.normalize, prepared.family, prepared.channel_stats))
    if config.runtime.decode == "device":  # a list the device path does not run, refused now, not in every worker
        decode_place("device", torch.device("cpu"), config.augment.augment)
    if model.weights_path or model.pretrained or model.pretrained_file:
        # The file (or the library's weights: fetched into its cache once, here) against the model, before Ray
        # starts any worker.
        build_model(model.model, prepared.num_classes, model.weights_path, head=head, pretrained=model.pretrained,
                    finetuning=finetuning, pretrained_file=model.pretrained_file)
    return config


def trainable_line(config: TrainConfig, prepared: PreparedDataset) -> tuple[str, float]:
    """The console line that says how much of the model trains, and the trainable fraction (trainable / total
    parameters, the run's ``trainable_fraction`` param)."""
    model = config.model
    head = build_criterion(config, prepared.source_prior, prepared.class_counts("train")).head
    trainable, total = parameter_counts(model.model, prepared.num_classes, head, model_finetuning(model))
    rank = f" (rank {model.peft_rank})" if model.peft_rank is not None else ""
    text = ", cosine head from the class names' text embeddings" if model.text_init else ""
    return (f"model {model.model}: peft {model.peft}{rank}{text}; {trainable:,} of {total:,} parameters trainable "
            f"({100 * trainable / total:.2f} %)", trainable / total)


def dataset_class_names(prepared) -> list[str]:
    """The class names a model of this dataset carries in its card (the manifest's, else "0", "1", ...)."""
    return list(prepared.manifest.get("class_names") or [str(c) for c in range(prepared.num_classes)])


def storage_uri(path: str | None, default: str) -> str:
    """Where Ray keeps checkpoints: a URI (``s3://``, ``gs://``, ...) unchanged, a local path made absolute."""
    path = path or default
    return path if "://" in path else str(Path(path).resolve())


class Finalizing:
    """What the steps of ``finalize`` share: the run's config and context, its dataset, its final
    ``ray.train.Checkpoint``, the MLflow client and what the run already holds (``have``). Each step does only what
    the run is missing, so any step can be rerun alone after a driver died halfway."""

    def __init__(self, config: TrainConfig, run: RunContext, prepared: PreparedDataset, checkpoint):
        self.config, self.run, self.prepared, self.checkpoint = config, run, prepared, checkpoint
        self.uri = config.runtime.mlflow_uri
        self.client, self.run_id = mlflow_client(self.uri), run.mlflow_run_id
        self.have = {a.path for d in ("eval", "checkpoint") for a in self.client.list_artifacts(self.run_id, d)}
        self.head = build_criterion(config, prepared.source_prior, prepared.class_counts("train")).head
        self.finetuning = model_finetuning(config.model)  # the backbone's adapters, the text-initialised head
        self.splits = {prepared.test_split: LOGITS_ARTIFACT, "val": VAL_LOGITS_ARTIFACT}  # split -> artifact
        self.computed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # logits this driver computed
        self._state = None

    def state(self) -> dict:
        """The final checkpoint's state (model weights ...), read once and only by a step that needs it."""
        if self._state is None:
            with self.checkpoint.as_directory() as d:
                self._state = load_checkpoint(d)
            if "model" not in self._state:  # a trial on cached features saved its head: the backbone joins it
                from lade_core.train.features import full_model_state

                self._state["model"] = full_model_state(self.config, self.run, self._state["head"])
        return self._state

    def split_logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, C], labels [N]) of ``split``: as computed by ``store_logits``, else read back from MLflow."""
        if split in self.computed:
            return self.computed[split]
        return read_logits_parquet(download_artifact(self.uri, self.run_id, self.splits[split]))


def backfill_epochs(f: Finalizing) -> None:
    """Step 1: the epochs rank 0 could not log (MLflow unreachable in the last epochs), from the final checkpoint's
    history; each (metric, epoch) once."""
    EpochLogger(f.uri, f.run_id).backfill(saved_history(f.checkpoint))


def store_logits(f: Finalizing) -> None:
    """Step 2: the test and validation logits the run lacks, into MLflow (Parquet). The ones the training workers
    computed in the last epoch (in its checkpoint); for a checkpoint without them, Ray Data batch inference on
    actors with the run's resources, every missing split in one pass over one pool (the model loads once per
    actor)."""
    config, rt = f.config, f.config.runtime
    missing = [split for split, artifact in f.splits.items() if artifact not in f.have]
    f.computed = final_logits(f.checkpoint, missing)
    rest = [split for split in missing if split not in f.computed]
    if rest:
        f.computed.update(batch_logits(f.prepared, rest, config.model.model, f.head, f.checkpoint,
                                       finetuning=f.finetuning, image_size=config.data.image_size,
                                       stats=config.augment.normalize, num_actors=rt.num_workers, use_gpu=rt.use_gpu,
                                       cpus_per_actor=rt.cpus_per_worker))
    for split, (z, y) in f.computed.items():
        artifact = f.splits[split]
        with tempfile.TemporaryDirectory() as d:
            write_logits_parquet(Path(d) / Path(artifact).name, z, y)
            f.client.log_artifact(f.run_id, str(Path(d) / Path(artifact).name), str(Path(artifact).parent))


def store_expert_views(f: Finalizing) -> None:
    """Step 2b, multi-expert models only: each expert's logits on the clean image and two augmented views of every
    test and validation image (what ``--aggregate self-supervised`` learns its weights from), from the last epoch's
    checkpoint; for a checkpoint without them, on the driver from its weights."""
    if f.head[0] != "experts":
        return
    config, prepared = f.config, f.prepared
    artifacts = {prepared.test_split: VIEWS_ARTIFACT, "val": VAL_VIEWS_ARTIFACT}
    missing = [split for split, artifact in artifacts.items() if artifact not in f.have]
    views = final_expert_views(f.checkpoint, missing)
    rest = [split for split in missing if split not in views]
    if rest:  # e.g. a champion whose trial a scheduler stopped before its last epoch
        model = build_model(config.model.model, prepared.num_classes, head=f.head, finetuning=f.finetuning)
        load_model_state(model, f.state()["model"])
        for split in rest:
            views[split] = sharded_expert_views(model, prepared, split, torch.device("cpu"), config.data.image_size,
                                                config.augment.normalize, 0, 1, config.runtime.seed)
    for split, v in views.items():
        name = Path(artifacts[split]).name
        with tempfile.TemporaryDirectory() as d:
            write_expert_views_parquet(Path(d) / name, v)
            f.client.log_artifact(f.run_id, str(Path(d) / name), str(Path(artifacts[split]).parent))


def log_test_metrics(f: Finalizing) -> list[dict]:
    """Step 3: test top-1 / Many / Medium / Few / NLL / ECE under the uniform prior and top-1 under forward and
    backward 10, with the loss's own rule, logged once. Returns their rows."""
    logits, labels = f.split_logits(f.prepared.test_split)
    counts = f.prepared.class_counts("train")
    targets = {t.name: t for t in protocol_targets(labels, counts)}
    rows = evaluate_targets(logits, labels, f.prepared.source_prior, counts, (default_rule(f.config.loss.loss),),
                            [targets[name] for name in ("uniform", "forward_10", "backward_10")])
    table = {r["target"]: r for r in rows}
    u = table["uniform"]
    log_metrics_once(f.client, f.run_id, {"test/top1": u["top1"], "test/many": u["many"], "test/medium": u["medium"],
                                          "test/few": u["few"], "test/nll": u["nll"], "test/ece": u["ece"],
                                          **{f"test/{name}/top1": table[name]["top1"]
                                             for name in ("forward_10", "backward_10")}})
    return rows


def store_weights(f: Finalizing) -> None:
    """Step 4: the final model's state dict as an artifact (what τ-norm and ``evaluate.py`` read), once."""
    if STATE_DICT_ARTIFACT in f.have:
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(f.state()["model"], Path(d) / Path(STATE_DICT_ARTIFACT).name)
        f.client.log_artifact(f.run_id, str(Path(d) / Path(STATE_DICT_ARTIFACT).name),
                              str(Path(STATE_DICT_ARTIFACT).parent))


def log_model(f: Finalizing) -> str:
    """Step 5: the model as a pyfunc that takes a target prior (``lade_core.tracking.model``), with BCTS calibration
    fitted on the validation split for prior estimation; once (a rerun finds it). Returns its ``models:/`` URI."""
    config, prepared = f.config, f.prepared
    model_uri = logged_model_uri(f.client, f.run_id, MODEL_NAME)
    if model_uri is not None:
        return model_uri
    source_prior = prepared.source_prior
    val_logits, val_labels = f.split_logits("val")
    loss = config.loss.loss
    calibration = auto_calibration(source_logits(val_logits, source_prior, loss), val_labels, source_prior)
    card = ModelCard(config.model.model, prepared.num_classes, dataset_class_names(prepared),
                     [float(x) for x in source_prior], loss, prepared.family,
                     prepared.crop_size(config.data.image_size), calibration and calibration.to_dict(),
                     head=list(f.head), lade_version=__version__, normalize=config.augment.normalize,
                     rules=list(posthoc_rules(loss)), finetuning=f.finetuning.to_dict())
    with active_run(f.uri, f.run_id):
        return log_classifier(card, f.state()["model"], MODEL_NAME).model_uri


def finalize(config: TrainConfig, run: RunContext, prepared: PreparedDataset, checkpoint) -> dict:
    """Test logits -> MLflow (Parquet artifact + metrics), the model as a pyfunc that takes a target prior
    (optionally registered), a summary table, and the run marked FINISHED: the named steps above, in order.

    Idempotent, step by step: a rerun after a driver died halfway does only what is missing (stored test logits
    are read back, not recomputed), and a rerun of a finished run logs and registers nothing new.
    """
    # Training is done and checkpointed: a tracking server that is down right now (restarting, a network blip) is
    # waited for, rather than failing the run at its last step. LADE_FINALIZE_WAIT_S: how long (default 300 s).
    rt = config.runtime
    wait_reachable(rt.mlflow_uri, float(os.environ.get("LADE_FINALIZE_WAIT_S", "300")),
                   "training is done and checkpointed: rerun the same command to finalize the run, nothing is "
                   "retrained")
    f = Finalizing(config, run, prepared, checkpoint)
    backfill_epochs(f)
    store_logits(f)
    store_expert_views(f)
    rows = log_test_metrics(f)
    store_weights(f)
    model_uri = log_model(f)
    if rt.register:
        register_once(f.client, f.run_id, rt.register, model_uri)
    end_run(rt.mlflow_uri, f.run_id)
    print(f"\nrun {rt.run_name} ({config.loss.loss}, post-hoc: {default_rule(config.loss.loss)}) — MLflow run "
          f"{f.run_id}")
    print(format_table(rows, ["target", "n", "top1", "many", "medium", "few", "nll", "ece"]), end="")
    return {r["target"]: r for r in rows}
