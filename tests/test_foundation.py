"""Foundation models fine-tuned the way LIFT does (lade_core.models.foundation): adapters in a frozen ViT, a linear
probe, a cosine head initialised from a CLIP text tower, pretrained weights from a local file in the Hugging Face
repository's layout; and, end to end, a PEFT run trained, registered and served."""
import copy
import dataclasses
import json
import os

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_train
from lade_core.config.recipes import resolve_train_config
from lade_core.config.schema import model_finetuning
from lade_core.data.prepare import prepare_dataset
from lade_core.data.prepared import open_prepared
from lade_core.data.synthetic import make_synthetic
from lade_core.models.backbones import build_model, parameter_counts
from lade_core.models.foundation import (
    PROMPT,
    AdaptFormer,
    Finetuning,
    apply_peft,
    class_text_embeddings,
    default_rank,
    init_head_from_text,
    text_tower_source,
)
from lade_core.tracking.artifacts import LOGITS_ARTIFACT, read_logits_parquet
from lade_core.train.loop import build_optimizer
from lade_core.train.runs import check_against_dataset

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("peft")

D, DEPTH, MLP = 64, 6, 192  # timm's test_vit: width 64, 6 blocks, mlp_ratio 3


def _ft(peft: str, rank: int | None = None) -> Finetuning:
    return Finetuning(peft, rank if rank is not None else default_rank(peft, 10, DEPTH))


@pytest.mark.parametrize("name,size", [("timm:test_vit", 32), ("vit_b_16", 224)])
@pytest.mark.parametrize("peft", ["adaptformer", "lora"])
def test_adapters_at_initialisation_leave_the_frozen_models_output_unchanged(name, size, peft):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    adapted = copy.deepcopy(model)
    apply_peft(adapted.backbone, _ft(peft), name)
    with torch.no_grad():
        after = adapted.eval()(x)
    assert torch.equal(before, after)  # exactly: the up-projection (B for LoRA) starts at zero
    trainable = {n for n, p in adapted.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(("adapter" in n) or ("lora_" in n) for n in trainable)
    added = sum(p.numel() for p in adapted.parameters()) - sum(p.numel() for p in model.parameters())
    assert added == sum(p.numel() for n, p in adapted.backbone.named_parameters() if n in trainable)


@pytest.mark.parametrize("peft", ["adaptformer", "lora", "linear"])
def test_only_adapter_and_head_parameters_change_after_a_step(peft):
    torch.manual_seed(0)
    model = build_model("timm:test_vit", 10, finetuning=_ft(peft))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, resolve_train_config(None, {"lr": 0.5}).optimizer)
    for _ in range(2):  # two steps: the up-projection moves in the first, the down-projection from the second
        loss = torch.nn.functional.cross_entropy(model.train()(torch.randn(8, 3, 32, 32)), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert {n for n in changed if not n.startswith("fc.")} == (
        set() if peft == "linear" else {n for n in trainable if not n.startswith("fc.")})
    assert all(n.startswith("fc.") or "adapter" in n or "lora_" in n for n in changed)
    assert any(n.startswith("fc.") for n in changed)


def test_the_trainable_fraction_is_the_adapters_and_the_head():
    # Counted from the architecture: per block, AdaptFormer's LN (2D) + down (D r + r) + up (r D + D) + s; LoRA's
    # A (D x r) and B (r x 3D) on qkv; the head D C + C.
    c, head = 10, D * 10 + 10
    for peft, rank, per_block in (("adaptformer", 4, 2 * D + D * 4 + 4 + 4 * D + D + 1),
                                  ("lora", 8, D * 8 + 8 * 3 * D), ("linear", None, 0)):
        trainable, total = parameter_counts("timm:test_vit", c, finetuning=Finetuning(peft, rank))
        assert trainable == DEPTH * per_block + head
        model = build_model("timm:test_vit", c, finetuning=Finetuning(peft, rank))
        assert total == sum(p.numel() for p in model.parameters())
    assert default_rank("adaptformer", 1000, 12) == 32 and default_rank("adaptformer", 100, 12) == 4
    assert default_rank("adaptformer", 365, 12) == 8 and default_rank("adaptformer", 10, 12) == 1


def test_a_linear_probe_runs_its_backbone_in_eval_mode():
    model = build_model("timm:test_vit", 10, finetuning=Finetuning("linear")).train()
    assert model.fc.training and not any(m.training for m in model.backbone.modules())
    full = build_model("timm:test_vit", 10).train()
    assert all(m.training for m in full.backbone.modules())


def test_adaptformer_is_lifts_adapter():
    a = AdaptFormer(8, 2)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        a.up_proj.weight.normal_()
        a.scale.fill_(0.5)
        ln = torch.nn.functional.layer_norm(x, (8,), a.ln.weight, a.ln.bias)
        ref = 0.5 * (torch.relu(ln @ a.down_proj.weight.T + a.down_proj.bias) @ a.up_proj.weight.T + a.up_proj.bias)
        torch.testing.assert_close(a(x), ref)


# --- A tiny CLIP in the layout of a Hugging Face timm/…clip… repository ------------------------------------

def write_tiny_clip(folder, seed: int = 0):
    """An open_clip model with timm's test_vit as its image tower and a 2-layer text tower, randomly initialised
    and saved as its repository holds it (open_clip_config.json beside open_clip_pytorch_model.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": {"embed_dim": 32,
                         "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                        "timm_pool": "token", "timm_proj": "", "image_size": 224},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                      "layers": 2}}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder / "open_clip_pytorch_model.bin"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_the_text_initialised_head_is_open_clips_zero_shot_classifier(tiny_clip):
    names = ["cat", "sea_lion", "fire truck"]
    source = text_tower_source("timm:test_vit", None, str(tiny_clip))
    assert source == f"local-dir:{tiny_clip.parent}"
    ft = Finetuning("adaptformer", 2, projection=32, scale=25.0)
    model = build_model("timm:test_vit", 3, finetuning=ft, pretrained_file=str(tiny_clip)).eval()
    init_head_from_text(model.fc, class_text_embeddings(source, names))
    clip = open_clip.create_model(f"local-dir:{tiny_clip.parent}").eval()
    tokens = open_clip.get_tokenizer(source)([PROMPT.format(n.replace("_", " ")) for n in names])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        zero_shot = clip.encode_image(x, normalize=True) @ clip.encode_text(tokens, normalize=True).T  # [5, 3] cos
        ours = model(x) / 25.0
    torch.testing.assert_close(ours, zero_shot, atol=1e-5, rtol=0)
    assert zero_shot.std() > 1e-3  # the classes' scores differ: the comparison can fail


def test_a_pretrained_file_loads_the_image_tower_and_one_for_another_architecture_is_refused(tiny_clip):
    model = build_model("timm:test_vit", 3, pretrained_file=str(tiny_clip))
    state = torch.load(tiny_clip, weights_only=True)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight,
                               state["visual.trunk.blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match=r"pretrained file .*open_clip_pytorch_model.bin does not fit model "
                                         r"timm:vit_tiny_patch16_224"):
        build_model("timm:vit_tiny_patch16_224", 3, pretrained_file=str(tiny_clip))
    with pytest.raises(ValueError, match="pretrained_file loads timm models"):
        build_model("resnet18", 3, pretrained_file=str(tiny_clip))


def test_bad_foundation_settings_are_refused_before_ray(tmp_path, tiny_clip):
    raw = make_synthetic(num_classes=3, image_size=16, max_count=12, imbalance_ratio=2, test_per_class=2, seed=0)
    prepare_dataset(raw, tmp_path / "named")
    prepare_dataset(dataclasses.replace(raw, class_names=None), tmp_path / "unnamed")

    def check(dataset, **over):
        config = resolve_train_config(None, {"dataset": str(tmp_path / dataset), "image_size": 16, "synthetic": None,
                                             "model": "timm:test_vit", "batch_size": 4, **over})
        return check_against_dataset(config, open_prepared(tmp_path / dataset))

    with pytest.raises(ValueError, match="has none .*no class_names"):
        check("unnamed", text_init=True, pretrained_file=str(tiny_clip))
    with pytest.raises(ValueError, match="peft lora adapts the transformer blocks .* model resnet18 has none"):
        check("named", model="resnet18", peft="lora")
    with pytest.raises(ValueError, match="peft_rank must be >= 1"):
        check("named", peft="lora", peft_rank=0)
    with pytest.raises(ValueError, match="peft_rank has no effect with peft linear"):
        check("named", peft="linear", peft_rank=4)
    with pytest.raises(ValueError, match="text_init needs a CLIP model's text tower"):
        check("named", text_init=True)
    with pytest.raises(ValueError, match="peft: must be one of"):
        check("named", peft="prefix")
    # The run records the rank it uses (LIFT's rule for 3 classes and 6 blocks: 1) and the projection's width.
    config = check("named", peft="adaptformer", text_init=True, pretrained_file=str(tiny_clip))
    assert config.model.peft_rank == 1
    assert model_finetuning(config.model) == Finetuning("adaptformer", 1, 32, 25.0)


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["adaptformer", "lora"])
def test_a_peft_run_trains_registers_and_serves_its_stored_logits(tmp_path, peft, tiny_clip):
    flags = ["--model", "timm:test_vit", "--peft", peft, "--image-size", "16", "--run-name", f"p-{peft}",
             "--register", f"m-{peft}", "--num-workers", "1"]
    if peft == "adaptformer":  # LIFT's recipe: a text-initialised cosine head over the CLIP embedding
        flags += ["--text-init", "--pretrained-file", str(tiny_clip), "--loss", "logit_adjusted"]
    out = run_train(tmp_path, *flags)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lade").experiment_id])
    params = run.data.params
    assert params["peft"] == peft and 0 < float(params["trainable_fraction"]) < 0.2
    assert f"peft {peft}" in out.stdout and "parameters trainable" in out.stdout
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/m-{peft}/1")
    card = model.unwrap_python_model().card
    assert card.finetuning["peft"] == peft and card.finetuning["rank"] == int(params["peft_rank"])
    if peft == "adaptformer":
        assert card.finetuning["projection"] == 32 and params["text_init"] == "True"
    logits, _ = read_logits_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                        artifact_path=LOGITS_ARTIFACT,
                                                                        tracking_uri=uri))
    t = pq.read_table(str(tmp_path / "data" / "synthetic_smoke" / "test"), columns=["image", "index"])
    index = np.asarray(t.column("index").to_pylist())
    served = model.predict(pd.DataFrame({"image": t.column("image").to_pylist()}),
                           params={"output": "logits", "posthoc": "raw"})
    np.testing.assert_allclose(np.stack(served["logits"]), logits[index].numpy(), rtol=1e-4, atol=1e-4)
    # Prior estimation and the online prior take these logits as any model's: the served ones give the stored ones'.
    from lade_core.math.label_shift import Calibration, OnlinePrior, estimate_target_prior, source_logits

    calibration = Calibration.from_dict(card.calibration) if card.calibration else None
    z = torch.from_numpy(np.stack(served["logits"])[np.argsort(index)])
    prior, _ = estimate_target_prior(z, card.source_prior, loss=card.loss, method="auto", calibration=calibration)
    ref, _ = estimate_target_prior(logits, card.source_prior, loss=card.loss, method="auto", calibration=calibration)
    np.testing.assert_allclose(prior.numpy(), ref.numpy(), atol=1e-3)
    online = OnlinePrior(card.source_prior, window=80, warmup=40)
    online.update(torch.softmax(source_logits(z, card.source_prior, card.loss), 1))
    assert online.trusted and online.prior.sum().item() == pytest.approx(1.0)


def test_tta_views_and_their_ensemble():
    from lade_core.data.transforms import tta_views
    from lade_core.math.posthoc import ensemble_views

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g) for _ in range(3)]
    (plain,) = tta_views(images, "imagenet", 32, "none")
    mirror = tta_views(images, "imagenet", 32, "flip")
    assert torch.equal(mirror[0], plain) and torch.equal(mirror[1], plain.flip(-1))
    crops = tta_views(images, "imagenet", 32, "five_crop")
    assert len(crops) == 5 and all(c.shape == (3, 3, 32, 32) for c in crops)
    # The centre crop of the image resized to 36 on its shorter side is the evaluation view (Resize 36, CenterCrop).
    assert torch.equal(crops[4], plain)
    from torchvision.transforms import v2

    big = v2.Resize(36, antialias=True)(images[0])  # [3, 36, 43]
    assert torch.equal(crops[0][0], big[:, :32, :32]) and torch.equal(crops[3][0], big[:, -32:, -32:])
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_views(images, "imagenet", 32, "ten_crop")
    z = torch.randn(5, 4, 7, dtype=torch.float64)
    want = np.log(np.mean([np.exp(v) / np.exp(v).sum(1, keepdims=True) for v in z.numpy()], axis=0))
    np.testing.assert_allclose(ensemble_views(z).numpy(), want, rtol=1e-12)


@pytest.mark.slow
def test_a_trial_on_cached_features_gives_the_full_pipelines_head_and_registers_with_its_backbone(tmp_path):
    """One linear probe trained twice with the same seed on the same images without augmentation: by train.py
    (images through the frozen backbone every step) and by a trial's ``fit_head`` on tune.py --cache-features's
    cached features. A batch larger than the split makes both one full-batch SGD step per epoch (the batch order
    is each path's own), so they must reach the same head."""
    import subprocess
    import sys

    from conftest import REPO
    from lade_core.config.context import split_flat_config
    from lade_core.tracking.artifacts import STATE_DICT_ARTIFACT
    from lade_core.tracking.model import load_classifier
    from lade_core.train.checkpoint import latest_checkpoint, load_checkpoint
    from lade_core.train.features import FEATURES_DIR, FEATURES_MANIFEST, fit_head

    flags = ["--model", "timm:test_vit", "--peft", "linear", "--image-size", "16"]
    out = run_train(tmp_path, *flags, "--augment", '[{"CenterCrop": {"size": 16}}]', "--batch-size", "512",
                    "--num-workers", "1", "--epochs", "3", "--lr", "0.5", "--run-name", "probe")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = tmp_path / "data" / "synthetic_smoke"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tune = subprocess.run([sys.executable, str(REPO / "pipelines" / "tune.py"), "--smoke-test", "--num-cpus", "4",
                           "--dataset", str(data), *flags, "--cache-features", "--register", "probe-champ",
                           "--num-samples", "1", "--scheduler", "fifo",
                           "--mlflow-uri", uri, "--storage-path", str(tmp_path / "tune"), "--experiment", "cached"],
                          cwd=tmp_path, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=900)
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    assert "each trial trains the head on them" in tune.stdout
    (folder,) = [p for p in (data / FEATURES_DIR).iterdir() if (p / FEATURES_MANIFEST).is_file()]
    manifest = json.loads((folder / FEATURES_MANIFEST).read_text())
    assert manifest["dim"] == D and manifest["splits"] == {"train": 90, "val": 80, "test": 80}
    # The same trial on the cached features: the full pipeline's resolved config, through fit_head.
    final = latest_checkpoint(str(tmp_path / "ray_results" / "probe"))
    config, run = split_flat_config(load_checkpoint(final.path)["config"])
    head = fit_head(config, run, folder, "test")
    client = mlflow.MlflowClient(uri)
    probe = client.search_runs([client.get_experiment_by_name("lade").experiment_id], "attributes.run_name = 'probe'")
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=probe[0].info.run_id,
                                                           artifact_path=STATE_DICT_ARTIFACT, tracking_uri=uri),
                       weights_only=True)
    start = build_model("timm:test_vit", 4, finetuning=Finetuning("linear"))  # any other head: far from both
    assert (state["fc.weight"] - start.fc.weight).abs().max() > 1e-2
    torch.testing.assert_close(head.weight, state["fc.weight"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(head.bias, state["fc.bias"], atol=2e-5, rtol=1e-4)
    # The champion (head + backbone, one model) serves the logits its trial stored from the cached features.
    mlflow.set_tracking_uri(uri)
    champion = load_classifier("models:/probe-champ@champion", uri)
    (trial,) = client.search_runs([client.get_experiment_by_name("cached").experiment_id],
                                  f"attributes.run_name = '{champion_run_name(client)}'")
    logits, _ = read_logits_parquet(mlflow.artifacts.download_artifacts(
        run_id=trial.info.run_id, artifact_path=LOGITS_ARTIFACT, tracking_uri=uri))
    t = pq.read_table(str(data / "test"), columns=["image", "index"])
    served = champion.predict(None, pd.DataFrame({"image": t.column("image").to_pylist()}),
                              params={"output": "logits", "posthoc": "raw"})
    index = np.asarray(t.column("index").to_pylist())
    np.testing.assert_allclose(np.stack(served["logits"]), logits[index].numpy(), rtol=1e-4, atol=1e-4)


def champion_run_name(client) -> str:
    version = client.get_model_version_by_alias("probe-champ", "champion")
    return client.get_run(version.run_id).info.run_name


def test_a_lora_model_pins_peft_for_serving_and_a_plain_one_does_not():
    from importlib.metadata import version

    from lade_core.tracking.model import serving_requirements

    assert f"peft=={version('peft').split('+')[0]}" in serving_requirements("timm:test_vit", {"peft": "lora"})
    assert not any(r.startswith("peft==") for r in serving_requirements("timm:test_vit", {"peft": "adaptformer"}))


@pytest.mark.parametrize("loss", ["lade", "balanced_softmax", "logit_adjusted", "sade", "balpoe", "ldam_drw"])
def test_every_loss_trains_on_a_text_initialised_head(loss, tiny_clip):
    from lade_core.methods import build_loss, classifier_head

    ps = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    extra = {"expert_stages": 0} if loss in ("sade", "balpoe") else {}  # a ViT's experts share its backbone
    kwargs = {"tau": 0.5} if loss == "logit_adjusted" else {}
    head = classifier_head(loss, ps, train_counts=[50, 30, 20], **extra, **kwargs)
    ft = Finetuning("lora", 2, projection=32, scale=25.0)
    model = build_model("timm:test_vit", 3, head=head, finetuning=ft, pretrained_file=str(tiny_clip))
    emb = class_text_embeddings(text_tower_source("timm:test_vit", None, str(tiny_clip)), ["a", "b", "c"])
    init_head_from_text(model.fc, emb)
    w = model.fc.weight.detach()
    torch.testing.assert_close(w, emb.expand_as(w))  # every expert's classes start at the text embeddings
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    criterion = build_loss(loss, ps, train_counts=[50, 30, 20], **extra, **kwargs)
    loss_value = criterion(model.train()(x), y)
    loss_value.backward()
    assert torch.isfinite(loss_value) and model.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        z = model.eval()(x)
    assert z.shape == (6, 3)
    if loss == "logit_adjusted":  # the adjusted head's inference offset survives the cosine classifier
        with torch.no_grad():
            cos = model.fc.scale * torch.nn.functional.normalize(model.backbone(x), dim=1) @ \
                torch.nn.functional.normalize(model.fc.weight, dim=1).T
        torch.testing.assert_close(z, cos + (0.5 - 1) * ps.log().float())


def _write_feature_split(folder, split, features, labels, seed):
    """A split of cached features as cache_features writes it (Parquet under <folder>/<split>/), rows shuffled."""
    import pyarrow as pa

    order = np.random.default_rng(seed).permutation(len(labels))
    (folder / split).mkdir(parents=True)
    pq.write_table(pa.table({"feature": [features[i].tolist() for i in order], "label": labels[order].tolist(),
                             "index": order.tolist()}), str(folder / split / "part-0.parquet"))


def test_a_head_trial_resumed_from_its_checkpoint_ends_where_an_unbroken_one_does(tmp_path):
    from lade_core.config.context import RunContext, flat_config
    from lade_core.train.checkpoint import latest_checkpoint, load_checkpoint, publish_checkpoint, save_checkpoint
    from lade_core.train.features import fit_head, read_features

    rng = np.random.default_rng(0)
    counts = [30, 12, 6]
    labels = np.repeat(np.arange(3), counts)
    features = (rng.normal(size=(len(labels), D)) + labels[:, None]).astype(np.float32)
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        _write_feature_split(tmp_path / "f", split, features, labels, seed)
    x, y = read_features(tmp_path / "f", "train")
    np.testing.assert_array_equal(x.numpy(), features)  # back in split order, whatever order the rows were written
    config = resolve_train_config(None, {"model": "timm:test_vit", "peft": "linear", "epochs": 3, "batch_size": 8,
                                         "lr": 0.2}).with_loss_defaults()
    run = RunContext((np.array(counts) / sum(counts)).tolist(), counts)
    states, finals = [], []
    whole = fit_head(config, run, tmp_path / "f", "test",
                     on_epoch=lambda m, st, final: (states.append(copy.deepcopy(st)), finals.append(final)))
    assert [s["epoch"] for s in states] == [0, 1, 2] and finals[:2] == [None, None]
    assert set(finals[2]) == {"val", "test"} and finals[2]["test"][0].shape == (48, 3)
    # The first epoch's checkpoint, published as a trial's, read back as a restarted trial reads it.
    d = tmp_path / "ckpt"
    d.mkdir()
    save_checkpoint(d, {k: v for k, v in states[0].items() if k != "history"}, flat_config(config, run),
                    states[0]["history"])
    path = publish_checkpoint(d, str(tmp_path / "trial"), {"epoch": 0, "val/top1": 0.5})
    latest = latest_checkpoint(str(tmp_path / "trial"))
    assert latest.epoch == 0 and latest.path == path and latest.metrics["val/top1"] == 0.5
    resumed = fit_head(config, run, tmp_path / "f", "test", state=load_checkpoint(latest.path))
    torch.testing.assert_close(resumed.weight, whole.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.bias, whole.bias, atol=1e-6, rtol=0)
    assert (whole.weight - build_model("timm:test_vit", 3).fc.weight).abs().max() > 1e-2
