"""The typed training config: every bad value is refused with the file (or command line) and the key, before Ray."""
import pytest

from lade_core.config.context import RunContext, SearchContext, flat_config, split_flat_config
from lade_core.config.recipes import resolve_config, resolve_train_config
from lade_core.config.schema import CLI, CONFIG_KEYS, DEFAULTS, TrainConfig, loss_config_keys, validate_config
from lade_core.methods import LOSS_KEYS, LOSSES
from lade_core.train.schedules import lr_factor


def _write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("schedule: {name: step}", "schedule step needs step_size"),
        ("schedule: {name: multistep}", "schedule multistep needs milestones"),
        ("schedule: {name: multistep, milestones: '120,160'}", "schedule.milestones must be a list of integers"),
        ("schedule: {name: multistep, milestones: [160, 120]}", "strictly ascending"),
        ("schedule: {name: cosine, milestones: [3]}", "schedule.milestones has no effect with schedule cosine"),
        ("schedule: {name: cosine, warmup_epoch: 2}", "unknown schedule keys ['warmup_epoch']"),
        ("schedule: {name: linear}", "schedule.name must be one of"),
        ("schedule: cosine", "schedule must be a mapping"),
        ("seed: abc", "seed must be an integer, got 'abc'"),
        ("seed: 1.5", "seed must be an integer, got 1.5"),
        ("epochs: true", "epochs must be an integer, got True"),
        ("epochs: 0", "epochs must be >= 1, got 0"),
        ("backbone_lr: -1", "backbone_lr must be >= 0, got -1"),
        ("lr: 0", "lr must be > 0, got 0"),
        ("lr: .nan", "lr must be a finite number"),
        ("momentum: 1.0", "momentum must be < 1"),
        ("use_gpu: 1", "use_gpu must be true or false, got 1"),
        ("amp: 'yes'", "amp must be true or false"),
        ("warmup_epoch: 2", "unknown config keys ['warmup_epoch']"),
        ("loss: focal_typo", "loss must be one of"),
        ("model: resnet9000", "unknown model 'resnet9000'"),
        ("weights_path: /no/such/weights.pt", "weights_path is not an existing file"),
        ("class_weights: [0.5, -0.5]", "class_weights[1] must be >= 0, got -0.5"),
        ("class_weights: 0.5", "class_weights must be a list"),
        ("class_weight_power: 2", "class_weight_power must be <= 1, got 2"),
        ("class_weight_power: 0.5\nclass_weights: [1, 1]", "set class_weights or class_weight_power, not both"),
        ("tau: 2", "loss lade takes no hyperparameters ['tau']"),
        ("loss: focal\ngamma: -1", "gamma must be >= 0, got -1"),
        ("loss: ldam_drw\nscale: -30", "scale must be > 0, got -30"),
        ("loss: ldam_drw\nepochs: 10\ndrw_epoch: 10", "drw_epoch 10 is beyond the run: epochs are 0..9"),
        ("loss: causal_norm\nheads: 0", "heads must be >= 1, got 0"),
        ("image_size: 4", "image_size must be >= 8, got 4"),
        ("batch_size: 1\nnum_workers: 2", "batch_size 1 is smaller than num_workers 2"),
        ("run_name: ../escape", "run_name must be a non-empty name without path separators"),
        ("experiment: ''", "experiment must not be empty"),
        ("synthetic: {num_classes: 4, max_cnt: 3}", "unknown synthetic keys ['max_cnt']"),
        ("max_failures: -2", "max_failures must be >= -1"),
        ("cpus_per_worker: 0", "cpus_per_worker must be > 0"),
        ("decode: gpu", "decode must be one of ['auto', 'worker', 'ray_data', 'device'], got 'gpu'"),
        ("- a\n- b", "a config file must be a mapping"),
        ("lr: [0.1\n", "invalid YAML at line"),
    ],
)
def test_bad_config_file_is_refused_naming_file_and_key(tmp_path, yaml_text, message):
    path = _write(tmp_path, yaml_text)
    with pytest.raises(ValueError) as e:
        resolve_config(path, {})
    assert message in str(e.value)
    assert str(path) in str(e.value)  # the file the bad value came from


def test_bad_value_from_the_command_line_names_the_command_line(tmp_path):
    with pytest.raises(ValueError, match=f"^{CLI}: epochs must be an integer"):
        resolve_config(None, {"epochs": "3"})
    with pytest.raises(ValueError, match="unknown config keys"):
        resolve_config(None, {"no_such_key": 1})


def test_base_chain_names_the_file_that_set_the_bad_key(tmp_path):
    base = _write(tmp_path, "lr: -0.1\nepochs: 3\n", "base.yaml")
    child = _write(tmp_path, "base: base.yaml\nloss: softmax\n", "child.yaml")
    with pytest.raises(ValueError) as e:
        resolve_config(child, {})
    assert str(base) in str(e.value) and "lr must be > 0" in str(e.value)
    # The command line wins over both files, and the result keeps every other key.
    cfg = resolve_config(child, {"lr": 0.05})
    assert cfg["lr"] == 0.05 and cfg["epochs"] == 3 and cfg["loss"] == "softmax"


def test_base_loop_and_missing_base_are_errors_not_tracebacks(tmp_path):
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ValueError, match="base loop: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        resolve_config(tmp_path / "a.yaml", {})
    _write(tmp_path, "base: nowhere.yaml\n", "c.yaml")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml \\(base of .*c.yaml\\)"):
        resolve_config(tmp_path / "c.yaml", {})


def test_a_child_schedule_replaces_its_base_schedule(tmp_path):
    _write(tmp_path, "schedule: {name: multistep, milestones: [5, 8], gamma: 0.1}\n", "base.yaml")
    child = _write(tmp_path, "base: base.yaml\nschedule: {name: cosine, warmup_epochs: 1}\n", "child.yaml")
    assert resolve_config(child, {})["schedule"] == {"name": "cosine", "warmup_epochs": 1}


def test_every_shipped_config_resolves_and_round_trips(tmp_path):
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].glob("configs/*/[a-z]*.yaml"))
    assert len(files) >= 12
    for path in files:
        cfg = resolve_config(path, {})
        assert TrainConfig.from_dict(cfg).to_dict() == cfg
        lr_factor(0, cfg["epochs"], cfg["schedule"])  # the schedule module accepts what the config accepts


def test_sections_cover_every_key_once_and_ints_stay_numbers():
    # Every key once; a config carries every key but the hyperparameters of losses added since lade's first runs
    # (balpoe's taus, the experts' expert_stages, a plugin's own), which only their own loss's configs carry.
    later = {k for k in LOSS_KEYS if k not in loss_config_keys(DEFAULTS["loss"])}
    assert set(CONFIG_KEYS) == set(DEFAULTS) | later and len(CONFIG_KEYS) == len(set(CONFIG_KEYS))
    assert {"taus", "expert_stages"} <= later
    assert set(resolve_config(None, {"loss": "balpoe"})) == set(DEFAULTS) | {"taus", "expert_stages"}
    cfg = resolve_config(None, {"lr": 1, "alpha": 0})  # an int where a float is expected is fine ...
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    with pytest.raises(ValueError, match="alpha must be a finite number, got False"):  # ... a boolean is not
        resolve_config(None, {"alpha": False})


def test_validate_config_checks_sampled_values_and_dataset_dependent_rules():
    cfg = {**resolve_config(None, {"dataset": "d"}), "source_prior": [0.5, 0.5]}  # derived keys pass through
    assert validate_config(cfg, 2)["source_prior"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        validate_config({**cfg, "alpha": -1.0})
    with pytest.raises(ValueError, match="class_weights has wrong length: 3 entries for 2 classes"):
        validate_config({**cfg, "class_weights": [1, 1, 1]}, 2)
    with pytest.raises(ValueError, match="no dataset"):
        validate_config({**cfg, "dataset": None})


def test_the_typed_config_and_run_context_cross_the_ray_boundary_as_one_flat_dict():
    """What a worker, a Tune trial and a restored search get back (``split_flat_config``) is the driver's typed
    config and run context; the flat dict holds exactly the keys runs always held (their params and digests)."""
    config = resolve_train_config(None, {"dataset": "d", "loss": "causal_norm"}).with_loss_defaults()
    assert config.loss.values["tau"] == LOSSES["causal_norm"].defaults["tau"]
    trial = RunContext([0.75, 0.25], [3, 1], "run-id", SearchContext("s", "/st/s", "lade", "parent-id"))
    flat = flat_config(config, trial)
    assert {k: flat[k] for k in ("search", "search_storage", "search_base_loss", "parent_run_id", "epoch_logging",
                                 "mlflow_run_id")} == {"search": "s", "search_storage": "/st/s",
                                                       "search_base_loss": "lade", "parent_run_id": "parent-id",
                                                       "epoch_logging": "driver", "mlflow_run_id": "run-id"}
    assert split_flat_config(flat) == (config, trial) and not trial.workers_log_epochs
    plain = RunContext([0.75, 0.25], [3, 1])  # a train.py run before its MLflow run exists
    assert set(flat_config(config, plain)) == {*DEFAULTS, "source_prior", "train_counts"}
    assert split_flat_config(flat_config(config, plain)) == (config, plain) and plain.workers_log_epochs
    with pytest.raises(ValueError, match=r"unknown config keys \['stray'\]"):
        split_flat_config({**flat, "stray": 1})
    with pytest.raises(ValueError, match="tau must be > 0"):
        split_flat_config({**flat, "tau": -1.0})  # a trial's sampled value is checked like a file's
    assert config.replace(run_name="r", lr=0.5).runtime.run_name == "r" and config.optimizer.lr == 0.1
    with pytest.raises(KeyError, match="schedule"):
        config.replace(schedule={"name": "constant"})


def test_an_image_size_the_model_cannot_train_on_is_refused_without_compute():
    from lade_core.models.backbones import check_input_size

    check_input_size("resnet32", 10, 8, 2)  # the CIFAR ResNet takes 8 px
    check_input_size("resnet50", 10, 32, 2)
    with pytest.raises(ValueError, match="model resnet50 cannot train on 8x8 images in batches of 1 per worker"):
        check_input_size("resnet50", 10, 8, 1)  # BatchNorm would see one value per channel


def test_a_config_digest_is_what_it_was_before_the_foundation_keys():
    """Digests computed by lade at 269cda7, before peft / peft_rank / text_init / pretrained_file existed: a run
    started then keeps its identity (and its default name, which holds the digest); a peft run gets its own."""
    from lade_core.train.driver import config_digest

    run = RunContext([0.75, 0.25], [3, 1])
    for over, before in (({"dataset": "d"}, "2c42dc00ed"),
                         ({"dataset": "d", "loss": "causal_norm", "model": "timm:test_vit", "pretrained": "DEFAULT"},
                          "370e2b2ae7")):
        config = resolve_train_config(None, over).with_loss_defaults()
        assert config_digest(config, run) == before
        assert config_digest(config.replace(peft="linear"), run) != before
