"""Inference where the workers are: uint8 batches normalized on the worker give the model the same input as the
float pipeline did; validation logits sharded over DDP workers and test logits from a Ray Data actor pool equal
single-process logits, with every sample exactly once when the split does not divide by the worker count."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lade_core.data.augment import PRESETS, resolve_normalize
from lade_core.data.transforms import ImageTransform, center_crop_batch, crop_flip_batch, decode_augment, normalize
from lade_core.serve.inference import merge_shards

STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]}  # not a family's: the one passed must be the one used


def _png(rng, size):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind, size", [("cifar", 32), ("imagenet", 96)])
def test_uint8_batches_normalized_on_the_worker_equal_the_float_pipeline(rng, kind, size):
    images = [_png(rng, size) for _ in range(5)]
    batch = {"image": images, "label": list(range(5)), "index": list(range(10, 15))}
    out = decode_augment(batch, ImageTransform(kind, size if kind == "cifar" else 64))
    assert out["image"].dtype == np.uint8 and out["index"].tolist() == list(range(10, 15))
    # The reference: torchvision's float conversion and Normalize on the same decoded, cropped pixels.
    mean, std = PRESETS[kind]["mean"], PRESETS[kind]["std"]
    ref = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(torch.from_numpy(out["image"])))
    assert torch.allclose(normalize(torch.from_numpy(out["image"]), resolve_normalize(None, kind, None)), ref,
                          atol=1e-5)


def test_decode_shard_keeps_a_disjoint_share_by_index(rng):
    batch = {"image": [_png(rng, 8) for _ in range(7)], "label": [0] * 7, "index": [3, 4, 5, 6, 7, 8, 9]}
    shares = [decode_augment(batch, ImageTransform("cifar", 8), shard=(r, 3))["index"].tolist() for r in range(3)]
    assert shares == [[3, 6, 9], [4, 7], [5, 8]]


def test_merge_shards_orders_by_index_and_refuses_drops_and_repeats():
    a = (torch.tensor([[1.0], [3.0]]), torch.tensor([1, 3]), torch.tensor([1, 3]))
    b = (torch.tensor([[0.0], [2.0]]), torch.tensor([0, 2]), torch.tensor([0, 2]))
    logits, labels = merge_shards([a, b], 4)
    assert logits.flatten().tolist() == [0.0, 1.0, 2.0, 3.0] and labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="dropped or repeated"):
        merge_shards([a, b], 5)
    with pytest.raises(RuntimeError, match="dropped or repeated"):
        merge_shards([a, a, (b[0][:1], b[1][:1], b[2][:1])], 5)  # repeated rows with the right count


@pytest.mark.slow
def test_sharded_and_actor_pool_logits_equal_single_process_logits(tmp_path, ray_local):
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lade_core.data import open_prepared
    from lade_core.data.prepare import prepare_dataset
    from lade_core.data.synthetic import make_synthetic
    from lade_core.models.backbones import build_model
    from lade_core.serve.inference import batch_logits, model_batches, predict_logits
    from lade_core.train.checkpoint import save_checkpoint

    (tmp_path / "ckpt").mkdir()
    # 4 classes: val 4 x 5 = 20 rows and test 4 x 7 = 28 rows, neither divisible by 3 workers.
    prepare_dataset(make_synthetic(num_classes=4, image_size=16, max_count=20, imbalance_ratio=2, val_per_class=5,
                                   test_per_class=7), tmp_path / "d", progress=False)
    prepared = open_prepared(tmp_path / "d")
    torch.manual_seed(0)
    model = build_model("resnet32", 4)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a model mix-up would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()

    def single(split):
        batches = prepared.ray_dataset(split).iter_torch_batches(batch_size=7)
        logits, labels, index = predict_logits(model, model_batches(batches, torch.device("cpu"), STATS))
        order = torch.argsort(index)
        assert index[order].tolist() == sorted(set(index.tolist())) and len(index) == len(set(index.tolist()))
        return logits[order], labels[order]

    # Defined here, not at module level: Ray pickles a local function by value (workers cannot import tests).
    def _sharded_loop(config):
        import ray.train

        from lade_core.data import open_prepared
        from lade_core.models.backbones import build_model
        from lade_core.serve.inference import sharded_logits

        ctx = ray.train.get_context()
        model = build_model("resnet32", 4)
        model.load_state_dict(config["state"])
        prepared, cache = open_prepared(config["dataset"]), {}
        out = sharded_logits(model, prepared, "val", torch.device("cpu"), None, config["stats"],
                             ctx.get_world_rank(), ctx.get_world_size(), cache)
        # The next epoch's pass reads this rank's decoded share from the cache, with the same result.
        assert sorted(cache) == ["val"] and sum(len(b["index"]) for b in cache["val"]) in (6, 7)
        again = sharded_logits(model, prepared, "val", torch.device("cpu"), None, config["stats"],
                               ctx.get_world_rank(), ctx.get_world_size(), cache)
        if ctx.get_world_rank() == 0:
            assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])
            torch.save(out, config["out"])
        else:
            assert out is None and again is None

    out = tmp_path / "val_logits.pt"
    TorchTrainer(_sharded_loop, train_loop_config={"state": model.state_dict(), "dataset": str(tmp_path / "d"),
                                                    "out": str(out), "stats": STATS},
                 scaling_config=ScalingConfig(num_workers=3),
                 run_config=RunConfig(name="sharded", storage_path=str(tmp_path / "ray"))).fit()
    sharded, sharded_labels = torch.load(out, weights_only=True)
    ref, ref_labels = single("val")
    assert sharded.shape == (20, 4) and torch.equal(sharded_labels, ref_labels)
    assert torch.allclose(sharded, ref, atol=1e-5)

    save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(), "epoch": 0}, {}, [])
    # Both splits in one pass over one actor pool, each back in its own split order.
    out = batch_logits(prepared, ("test", "val"), "resnet32", ("linear", {}), Checkpoint(str(tmp_path / "ckpt")),
                       image_size=None, stats=STATS, num_actors=2, use_gpu=False, batch_size=5)
    for split, n in (("test", 28), ("val", 20)):
        logits, labels = out[split]
        ref, ref_labels = single(split)
        assert logits.shape == (n, 4) and torch.equal(labels, ref_labels)
        assert torch.allclose(logits, ref, atol=1e-5)


def test_cifar_batch_transform_is_a_crop_of_the_padded_image_or_its_mirror():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    seeds = np.random.default_rng(0).integers(0, 2**63, 64, dtype=np.uint64)
    out = crop_flip_batch(images, 32, 4, 0.5, seeds)
    assert torch.equal(out, crop_flip_batch(images, 32, 4, 0.5, seeds))  # a sample's seed fixes its crop and coin
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets, flips = set(), 0
    for i in range(64):
        found = [(t, left, f) for t in range(9) for left in range(9) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, t:t + 32, left:left + 32]))]
        assert found, i
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 20 and 15 < flips < 49  # each image its own crop and coin
    assert not crop_flip_batch(images, 32, 4, 0.0, seeds).equal(out)  # p = 0: no mirror
    assert torch.equal(center_crop_batch(images, 32), images)
    assert torch.equal(center_crop_batch(images, 24), images[:, :, 4:28, 4:28])
