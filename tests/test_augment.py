"""The user's recipe without Ray: augment lists and normalization as config data, any torchvision / timm backbone,
pretrained weights from the library's cache, checkpoints with another class count, mixup / cutmix."""
import json

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from lade_core.config.recipes import resolve_config
from lade_core.data.augment import (
    AugmentError,
    ChannelStats,
    augment_seed,
    build_augment,
    resolve_augment,
    resolve_normalize,
    sample_seeds,
)
from lade_core.data.transforms import ImageTransform, seeded_steps, transform_batch
from lade_core.math.mixing import BatchMix, mixed_loss
from lade_core.methods import LOSSES, build_loss
from lade_core.models.backbones import Backbone, build_model, check_input_size, load_model_state


def _images(n=6, h=20, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(n)]


# --- augment ---------------------------------------------------------------------------------------------------

def test_augment_list_is_the_torchvision_pipeline_it_names():
    specs = resolve_augment([{"RandomResizedCrop": {"size": 16, "scale": [0.5, 1.0], "interpolation": "nearest"}},
                             {"RandomApply": {"transforms": [{"ColorJitter": {"brightness": 0.5}}], "p": 0.5}},
                             {"RandomRotation": {"degrees": 10}}], "imagenet", 16, [(20, 24)])
    compose = build_augment(specs)
    assert [type(t).__name__ for t in compose.transforms] == ["RandomResizedCrop", "RandomApply", "RandomRotation"]
    assert compose.transforms[0].scale == [0.5, 1.0]
    assert compose.transforms[0].interpolation == v2.InterpolationMode.NEAREST
    assert type(compose.transforms[1].transforms[0]).__name__ == "ColorJitter"
    # The image path: each image its own draw, fixed by (epoch seed, sample index), whatever the batch.
    images, index = _images(6, 20, 24), np.arange(100, 106)
    tf = ImageTransform("imagenet", 16, specs, augment_seed(0, 3))
    out = transform_batch(images, tf, index)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out[2:], transform_batch(images[2:], tf, index[2:]))  # another batch, the same samples
    # The reference: torchvision's own pipeline, seeded as transform_batch seeds it per sample.
    seeds = sample_seeds(tf.seed, index)
    for i in range(6):
        torch.default_generator.manual_seed(int(seeds[i] >> np.uint64(1)))
        assert torch.equal(out[i], compose(images[i]))
    other = transform_batch(images, ImageTransform("imagenet", 16, specs, augment_seed(0, 4)), index)
    assert not torch.equal(out, other)  # another epoch, other draws


@pytest.mark.parametrize("specs", [
    "imagenet",  # the preset: RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4)
    [{"RandomResizedCrop": {"size": 16, "scale": [0.5, 1.0], "ratio": [0.5, 2.0], "interpolation": "nearest"}},
     {"ColorJitter": {"brightness": 0.8, "saturation": [0.0, 2.0], "hue": 0.3}}, {"RandomHorizontalFlip": {"p": 0.9}}],
    # ratios no 20x24 crop can have: RandomResizedCrop's 10 tries fail and it falls back to the central crop
    [{"RandomResizedCrop": {"size": 16, "scale": [0.99, 1.0], "ratio": [3.0, 4.0], "antialias": False}}],
    [{"ColorJitter": {"contrast": [0.0, 3.0]}}, {"RandomResizedCrop": {"size": 16}}],
])
def test_the_seeded_path_gives_torchvisions_images_bit_for_bit(specs):
    """The seeded path (its own generator per call, torchvision's kernels called directly) against torchvision's
    pipeline seeded per sample on the global generator: every pixel of every image equal."""
    specs = resolve_augment(specs, "imagenet", 16, [(20, 24)])
    assert seeded_steps(specs) is not None  # these lists take the seeded path
    images, index = _images(64, 20, 24, seed=3), np.arange(64)
    tf = ImageTransform("imagenet", 16, specs, augment_seed(1, 2))
    out = transform_batch(images, tf, index)
    compose, seeds = build_augment(specs), sample_seeds(tf.seed, index)
    state = torch.get_rng_state()
    for i in range(64):
        torch.default_generator.manual_seed(int(seeds[i] >> np.uint64(1)))
        assert torch.equal(out[i], compose(images[i])), f"image {i}"
    torch.set_rng_state(state)
    assert seeded_steps([*specs, {"RandomGrayscale": {"p": 0.2}}]) is None  # any other step: torchvision's pipeline


def _jpeg_blocks(n=40, per_block=16):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (18 + i % 5, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
        encoded.append(buf.getvalue())
    index = np.arange(n)
    return [{"image": np.array(encoded[s:s + per_block], dtype=object), "label": index[s:s + per_block] % 3,
             "index": index[s:s + per_block]} for s in range(0, n, per_block)]


@pytest.mark.parametrize("specs", ["imagenet", [{"RandomGrayscale": {"p": 0.5}}, {"RandomResizedCrop": {"size": 16}}],
                                   None])
def test_decoding_on_threads_gives_the_one_thread_chunks_and_leaves_the_callers_draws_alone(specs):
    """``decode_augment_threaded`` (a worker decoding its own rows) on 3 threads: the chunks of one thread, in order,
    for the seeded path, for a list torchvision draws from the global generator (run in the caller's thread) and
    for the evaluation transform; the caller's own draws between chunks (dropout, mixup) are what they are
    without any decoding."""
    from lade_core.data.transforms import decode_augment_threaded

    blocks = _jpeg_blocks()
    augment = None if specs is None else resolve_augment(specs, "imagenet", 16, [(18, 24)])
    tf = ImageTransform("imagenet", 16, augment, None if augment is None else augment_seed(0, 1))
    torch.manual_seed(5)
    expected_draws = [torch.rand(1) for _ in range(8)]
    runs = {}
    for threads in (1, 3):
        torch.manual_seed(5)
        chunks, draws = [], []
        for chunk in decode_augment_threaded(blocks, tf, threads=threads, chunk=6):
            chunks.append(chunk)
            draws.append(torch.rand(1))  # the training step's own draws
        assert torch.equal(torch.cat(draws), torch.cat(expected_draws[:len(draws)])), threads
        runs[threads] = chunks
    assert len(runs[1]) == len(runs[3]) == 8  # 6-row chunks of each 16-row block
    for a, b in zip(runs[1], runs[3]):
        assert all(np.array_equal(a[k], b[k]) for k in ("image", "label", "index"))
    assert np.array_equal(np.concatenate([c["index"] for c in runs[3]]), np.arange(40))


def test_reduced_decoding_crops_what_the_full_decode_crops_at_a_fraction_of_the_pixels():
    """``reduced_decode``: a JPEG whose RandomResizedCrop box allows it is decoded at 1/2, 1/4 or 1/8 of its size and
    the box scaled to it. The crops are the full decode's within a mean absolute difference of 3 (another crop of
    the same image is ~40 away); a PNG, which has no reduced decode, gives the full decode's bytes; and on threads
    the chunks are those of one thread."""
    import io

    from PIL import Image, ImageDraw

    from lade_core.data.transforms import decode_augment, decode_augment_threaded

    rng, encoded = np.random.default_rng(0), {"JPEG": [], "PNG": []}
    for _ in range(16):
        im = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((480, 360), Image.BICUBIC)
        ImageDraw.Draw(im).ellipse([60, 80, 300, 330], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        for kind in encoded:
            buf = io.BytesIO()
            im.save(buf, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
            encoded[kind].append(buf.getvalue())
    specs = resolve_augment("imagenet", "imagenet", 48, [(360, 480)])
    full, reduced, other = (ImageTransform("imagenet", 48, specs, augment_seed(0, e), reduced_decode=r)
                            for e, r in ((1, False), (1, True), (2, False)))
    for kind, images in encoded.items():
        batch = {"image": np.array(images, dtype=object), "label": np.zeros(16, np.int64), "index": np.arange(16)}
        a, b, c = (decode_augment(batch, tf)["image"].astype(np.int64) for tf in (full, reduced, other))
        if kind == "PNG":
            assert np.array_equal(a, b)
            continue
        per_image = np.abs(a - b).mean(axis=(1, 2, 3))
        assert per_image.mean() < 3 and (per_image > 0).sum() >= 8, per_image  # most boxes allowed 1/2 or less
        assert np.abs(a - c).mean() > 20
        threaded = list(decode_augment_threaded([batch], reduced, threads=3, chunk=5))
        assert np.array_equal(np.concatenate([t["image"] for t in threaded]), b)


def test_presets_resolve_to_their_lists_and_the_crop_flip_fast_path_matches_its_distribution():
    assert resolve_augment(None, "cifar", 32, [(32, 32)]) == [{"RandomCrop": {"size": 32, "padding": 4}},
                                                             {"RandomHorizontalFlip": {}}]
    resolved = resolve_augment("imagenet", "cifar", 24, [(32, 32)])
    assert resolved[0] == {"RandomResizedCrop": {"size": 24, "antialias": True}}
    images = _images(400, 12, 12)
    for specs, flips in (([{"RandomCrop": {"size": 12, "padding": 2}}], False),
                         ([{"RandomCrop": {"size": 12, "padding": 2}}, {"RandomHorizontalFlip": {"p": 0.5}}], True)):
        out = transform_batch(images, ImageTransform("cifar", 12, specs, 7), np.arange(400))
        padded = [torch.nn.functional.pad(im, (2, 2, 2, 2)) for im in images]
        found = [[(t, left, f) for t in range(5) for left in range(5) for f in (False, True)
                  if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i][:, t:t + 12, left:left + 12]))][0]
                 for i in range(400)]
        assert len({f[:2] for f in found}) == 25  # every offset of RandomCrop(12, padding=2)
        n_flipped = sum(f[2] for f in found)
        assert (150 < n_flipped < 250) if flips else n_flipped == 0


@pytest.mark.parametrize("augment, message", [
    ([{"RandomCrp": {"size": 16}}],
     "unknown transform 'RandomCrp' (torchvision.transforms.v2); did you mean ['RandomCrop'"),
    ([{"RandomCrop": {"size": 16, "paddin": 4}}], "augment[0]: RandomCrop(size=16, paddin=4)"),
    ([{"RandomCrop": {"size": 16}}, {"MixUp": {}}],
     "augment[1]: MixUp is not an augment entry: use the config key `mixup"),
    ([{"RandomCrop": {"size": 16}}, {"Normalize": {"mean": [0], "std": [1]}}], "normalization is the config key"),
    ([{"RandomCrop": {"size": 16}, "RandomHorizontalFlip": {}}], "an augment entry is one {TransformName"),
    ("cutout", "augment preset 'cutout' is unknown"),
    ([{"Resize": {"size": 8, "interpolation": "cubic"}}], "Resize interpolation 'cubic': choose one of"),
])
def test_bad_augment_is_one_clear_error_naming_the_entry(augment, message):
    with pytest.raises(ValueError) as e:
        resolve_config(None, {"augment": augment})
    assert message in str(e.value), str(e.value)
    assert "command line: augment" in str(e.value)


def test_augment_output_must_be_the_crop_size_on_the_datasets_image_sizes():
    with pytest.raises(AugmentError, match=r"augment gives 20x20 images from 20x20 inputs, not the crop size 16x16"):
        resolve_augment([{"RandomHorizontalFlip": {}}], "cifar", 16, [(20, 20)])
    with pytest.raises(AugmentError, match=r"augment gives 35x25 images from 35x25 inputs"):  # sizes vary: a flip alone
        resolve_augment([], "imagenet", 16, [(16, 16), (35, 25)])
    with pytest.raises(AugmentError, match=r"augment\[0\] RandomCrop fails on a 12x12 image"):
        resolve_augment([{"RandomCrop": {"size": 16}}], "cifar", 16, [(12, 12)])
    with pytest.raises(AugmentError, match=r"augment\[0\] Grayscale turns a uint8 \[3, 16, 16\] image into"):
        resolve_augment([{"Grayscale": {}}], "cifar", 16, [(16, 16)])
    assert resolve_augment([], "cifar", 16, [(16, 16)]) == []  # none at all, on images of the crop size


# --- normalization ---------------------------------------------------------------------------------------------

def test_normalize_values_and_their_errors():
    assert resolve_normalize(None, "cifar", None) == {"mean": [0.507, 0.487, 0.441], "std": [0.267, 0.256, 0.276]}
    assert resolve_normalize("imagenet", "cifar", None)["mean"] == [0.485, 0.456, 0.406]
    stats = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert resolve_normalize("dataset", "cifar", stats) == stats
    with pytest.raises(AugmentError, match="prepared by an older lade"):
        resolve_normalize("dataset", "cifar", None)
    for value, message in (({"mean": [0.5], "std": [0.2]}, "normalize.mean must be 3 finite numbers"),
                           ({"mean": [0.5] * 3, "std": [0.2, 0, 0.2]}, "normalize.std must be > 0"),
                           ({"mean": [0.5] * 3}, "normalize must be `dataset`"), ("zscore", "normalize must be")):
        with pytest.raises(ValueError, match=message):
            resolve_config(None, {"normalize": value})


def test_channel_stats_are_the_pixel_mean_and_std():
    images = _images(5, 9, 7)
    stats = ChannelStats()
    for im in images:
        stats.add(im)
    x = torch.stack(images).double().div(255).permute(1, 0, 2, 3).reshape(3, -1)  # [3, all pixels]
    out = stats.result()
    assert np.allclose(out["mean"], x.mean(1).numpy(), atol=1e-6)
    assert np.allclose(out["std"], x.std(1, unbiased=False).numpy(), atol=1e-6)


# --- mixup / cutmix --------------------------------------------------------------------------------------------

def test_mixed_loss_is_the_soft_target_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (8,), generator=g)
    prior = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    lam = 0.3
    soft = lam * torch.nn.functional.one_hot(y, 5) + (1 - lam) * torch.nn.functional.one_hot(y.flip(0), 5)
    # Balanced Softmax (Eq. 19) with a soft target: -sum_c t_c log softmax(z + log p_s)_c, averaged.
    ref = -(soft * torch.log_softmax(z + prior.log(), 1)).sum(1).mean()
    loss = mixed_loss(build_loss("balanced_softmax", prior), z, y, lam)
    assert torch.allclose(loss, ref)
    g1, = torch.autograd.grad(loss, z)
    g2, = torch.autograd.grad(ref, z)
    assert torch.allclose(g1, g2)


def test_mixup_and_cutmix_images_and_the_losses_that_refuse_them():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    mixed, lam = BatchMix(mixup_alpha=1.0)(x, np.random.default_rng(0))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    cut, lam = BatchMix(cutmix_alpha=1.0)(x, np.random.default_rng(3))
    from_other = (cut == x.flip(0)).all(1)[0]  # [H, W] pixels of image 0 taken from image 1
    assert 0 < lam < 1 and from_other.double().mean() == pytest.approx(1 - lam)
    for loss in ("lade", "ldam_drw"):
        with pytest.raises(ValueError,
                           match=f"mixup trains on mixed \\(soft\\) targets, which loss {loss} cannot take"):
            resolve_config(None, {"loss": loss, "mixup": {"alpha": 0.2}})
    assert {k for k, s in LOSSES.items() if s.hard_targets_only} == {"lade", "ldam_drw"}
    assert resolve_config(None, {"loss": "softmax", "cutmix": {"alpha": 1}})["cutmix"] == {"alpha": 1.0}
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        resolve_config(None, {"loss": "softmax", "mixup": {"alpha": 0}})


def test_train_one_epoch_trains_on_the_mixed_batch():
    """The worker loop's wiring: with ``mix`` every batch is mixed with draws from ``rng``, and the loss reported is
    ``mixed_loss`` on it (lr 0 keeps the model, so the epoch's loss can be recomputed)."""
    from lade_core.config.schema import OptimizerConfig
    from lade_core.train.loop import build_optimizer, train_one_epoch

    torch.manual_seed(0)
    model = build_model("resnet32", 3)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-12, backbone_lr=0.0, momentum=0.0, weight_decay=0.0))
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    criterion = build_loss("balanced_softmax", prior)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 0])
    mix = BatchMix(mixup_alpha=0.4, cutmix_alpha=1.0)
    out = train_one_epoch(model, criterion, optimizer, [{"image": x, "label": y}], torch.device("cpu"), False,
                          mix=mix, rng=np.random.default_rng(5))
    mixed, lam = mix(x, np.random.default_rng(5))
    assert 0 < lam < 1 and not torch.equal(mixed, x)
    expected = mixed_loss(criterion, model.train()(mixed), y, lam)
    assert out["train/loss"] == pytest.approx(float(expected), rel=1e-5)


# --- backbones -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, head", [("mobilenet_v3_small", ("linear", {})),
                                        ("vit_b_16", ("cosine", {"scale": 30.0})),
                                        ("timm:test_resnet", ("causal_norm", {"heads": 2}))])
def test_any_torchvision_or_timm_model_gets_the_losses_head(name, head):
    model = build_model(name, 5, head=head)
    assert isinstance(model, Backbone) and model.fc.weight.shape[0] == 5
    check_input_size(name, 5, 224 if "vit" in name else 32, 4, head)
    if "vit" not in name:
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_bad_model_and_pretrained_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown model 'mobilenetv3_small'; did you mean \['mobilenet_v3_small'"):
        resolve_config(None, {"model": "mobilenetv3_small"})
    with pytest.raises(ValueError, match=r"did you mean \['timm:resnet18'"):
        resolve_config(None, {"model": "timm:resnet_18"})
    with pytest.raises(ValueError, match="model resnet32 has no pretrained weights"):
        build_model("resnet32", 5, pretrained="DEFAULT")
    with pytest.raises(ValueError,
                       match=r"torchvision model resnet18 has no weights 'IMAGENET22K'; choose DEFAULT or one of "
                             r"\['IMAGENET1K_V1'\]"):
        build_model("resnet18", 5, pretrained="IMAGENET22K")
    with pytest.raises(ValueError, match="timm model test_resnet has no pretrained weights 'in22k'"):
        build_model("timm:test_resnet", 5, pretrained="in22k")
    with pytest.raises(ValueError, match="has no linear classifier"):
        build_model("squeezenet1_0", 5)


def test_pretrained_weights_come_from_the_torchvision_cache(tmp_path, monkeypatch):
    """An offline machine with a filled cache: torchvision's weights file in $TORCH_HOME/hub/checkpoints (random
    values here, so the test can tell they were loaded) and no network needed."""
    import torchvision

    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    cached = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model("mobilenet_v3_small", 7, pretrained="DEFAULT")
    own = model.state_dict()
    assert all(torch.equal(own[f"backbone.{k}"], v) for k, v in cached.items() if not k.startswith("classifier.3."))
    assert own["fc.weight"].shape == (7, 1024)


@pytest.mark.parametrize("name, make", [
    ("resnet18", lambda: __import__("torchvision").models.resnet18(num_classes=1000)),
    ("timm:test_resnet", lambda: __import__("timm").create_model("test_resnet", num_classes=1000))])
def test_a_checkpoint_with_another_class_count_loads_without_its_classifier(tmp_path, name, make):
    source = make()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(name, 5, weights_path=str(tmp_path / "w.pt"))
    own = model.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own[f"backbone.{k}"], v), k
    assert own["fc.weight"].shape[0] == 5
    # A lade checkpoint of the same model (its own layout) loads as it is, classifier included.
    torch.save(model.state_dict(), tmp_path / "lade.pt")
    again = build_model(name, 5, weights_path=str(tmp_path / "lade.pt"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in own.items())
    # Another backbone is refused, naming what does not match.
    torch.save(__import__("torchvision").models.resnet34().state_dict(), tmp_path / "other.pt")
    if name == "resnet18":
        with pytest.raises(ValueError, match="does not match model resnet18: keys not in the model"):
            build_model(name, 5, weights_path=str(tmp_path / "other.pt"))


def test_a_model_saved_before_backbones_were_wrapped_still_loads():
    import torchvision

    old = torchvision.models.resnet18(num_classes=5).state_dict()  # how a lade before Backbone saved resnets
    model = build_model("resnet18", 5)
    load_model_state(model, old)
    assert torch.equal(model.state_dict()["fc.weight"], old["fc.weight"])
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], old["conv1.weight"])


def test_recipe_keys_reach_the_run_config():
    cfg = resolve_config(None, {"augment": [{"RandomCrop": {"size": 32, "padding": 4}}], "normalize": "dataset",
                                "model": "timm:test_resnet", "pretrained": "DEFAULT"})
    assert cfg["augment"] == [{"RandomCrop": {"size": 32, "padding": 4}}] and cfg["normalize"] == "dataset"
    json.dumps(cfg)  # what the checkpoint and MLflow get
