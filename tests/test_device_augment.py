"""Decoding and augmenting on the training worker's device (``decode: device``; ``auto`` on a GPU where nvJPEG
works), run here on the CPU: torchvision's draws, its float resize as one batched resample, its flip and jitter
bits on the same crops, and the training batches of the device path beside the worker path's."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from lade_core.data import device_augment as da
from lade_core.data.augment import augment_seed, build_augment, resolve_augment, sample_seeds
from lade_core.data.prepared import decode_place
from lade_core.data.transforms import ImageDecodeError, ImageTransform, decode_augment, decode_rgb

CPU = torch.device("cpu")


def _jpegs(n: int, seed: int = 0, low: int = 40, high: int = 90) -> list[bytes]:
    """JPEGs of random sizes in [low, high) a side: smooth colour fields with noise, as photographs compress."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(low, high, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.clip(np.asarray(coarse, np.float32) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _specs(spec, size=32):
    return resolve_augment(spec, "imagenet", size, [(64, 64)])


JITTERY = [{"RandomResizedCrop": {"size": 32, "scale": [0.05, 1.0]}}, {"RandomHorizontalFlip": {"p": 0.5}},
           {"ColorJitter": {"brightness": 0.6, "contrast": [0.0, 2.0], "saturation": 0.8, "hue": 0.2}}]


def test_the_draws_are_torchvisions_from_the_same_seeds():
    """Each image's box, coin, jitter order and factors: what torchvision's transforms draw from the global
    generator seeded as the seeded path seeds it."""
    specs = _specs(JITTERY)
    steps = da.device_steps(specs)
    shapes = [(40 + 3 * i, 90 - 2 * i) for i in range(20)]
    seeds = sample_seeds(augment_seed(3, 1), np.arange(20))
    boxes, coins, jitters = da.draw_params(steps, shapes, seeds)
    crop, flip, jitter = build_augment(specs).transforms
    for i, (h, w) in enumerate(shapes):
        torch.manual_seed(int(seeds[i] >> np.uint64(1)))
        p = crop.make_params([torch.zeros(3, h, w, dtype=torch.uint8)])
        assert boxes[i] == (p["top"], p["left"], p["height"], p["width"])
        assert coins[i] == bool(torch.rand(1) < flip.p)
        q = jitter.make_params([])
        assert jitters[i][0] == q["fn_idx"].tolist()
        assert jitters[i][1] == [q["brightness_factor"], q["contrast_factor"], q["saturation_factor"],
                                 q["hue_factor"]]


@pytest.mark.parametrize("antialias", [True, False])
def test_the_batched_resample_is_torchs_float_resize(antialias):
    """One batched resample of crops of every size (shrunk, enlarged, one side each) against torch's own resize of
    each crop in float32, rounded (torchvision's path on a GPU): all but rounding ties (under 0.5 %) equal; its
    uint8 kernel (16-bit fixed point, the CPU path) within 1 grey level."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=g)
              for h, w in [(70, 90), (20, 25), (64, 33), (30, 100), (90, 90), (41, 17)]]
    boxes = [(5, 7, 60, 80), (2, 3, 17, 20), (0, 0, 64, 33), (4, 10, 25, 12), (0, 0, 90, 90), (1, 2, 40, 15)]
    out = da.resample_crops(images, boxes, [32, 28], antialias)
    assert out.shape == (6, 3, 32, 28)
    ref = torch.stack([F.resized_crop_image(im.float(), *b, size=[32, 28], antialias=antialias).round()
                       for im, b in zip(images, boxes)])
    diff = (out - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 5e-3, (diff.max(), (diff > 0).float().mean())
    fixed = torch.stack([F.resized_crop_image(im, *b, size=[32, 28], antialias=antialias)
                         for im, b in zip(images, boxes)])
    assert (out - fixed.float()).abs().max() <= 1
    # Crops resampled in several groups (a small byte budget) are the crops resampled at once.
    budget, da.RESAMPLE_BYTES = da.RESAMPLE_BYTES, 3 * 4 * 90 * 90
    try:
        assert torch.equal(da.resample_crops(images, boxes, [32, 28], antialias), out)
    finally:
        da.RESAMPLE_BYTES = budget


def test_the_batched_flip_and_jitter_are_torchvisions_bits():
    """Given the same crops, the batched flip and ColorJitter (each image its own order and factors, hue included)
    give every bit of torchvision's functional kernels applied image by image in that order."""
    specs = _specs(JITTERY)
    steps = da.device_steps(specs)
    g = torch.Generator().manual_seed(1)
    crops = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    _, coins, jitters = da.draw_params(steps, [(32, 32)] * 48, sample_seeds(7, np.arange(48)))
    x = torch.where(torch.tensor(coins).view(-1, 1, 1, 1), crops.float().flip(-1), crops.float())
    out = da._uint8(da.jitter_batch(x, jitters))
    kernels = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    assert len({tuple(j[0]) for j in jitters}) > 10  # many orders in one batch
    for i in range(48):
        ref = crops[i].flip(-1) if coins[i] else crops[i]
        order, factors = jitters[i]
        for step in order:
            ref = kernels[step](ref, factors[step])
        assert torch.equal(out[i], ref), f"image {i}"


def test_the_device_path_is_the_cpu_path_up_to_rounding_and_keeps_its_rows():
    """``device_decode_augment`` on JPEGs of many sizes against ``decode_augment``'s seeded path (the CPU kernels):
    the same rows selected, the images within rounding of each other."""
    specs = _specs("imagenet")
    tf = ImageTransform("imagenet", 32, specs, augment_seed(0, 3))
    data = _jpegs(40)
    batch = {"image": np.array(data, dtype=object), "label": np.arange(40) % 7, "index": np.arange(40) * 2}
    rows = np.arange(0, 80, 6)
    cpu, dev = decode_augment(batch, tf, rows=rows), da.device_decode_augment(batch, tf, CPU, rows=rows)
    assert np.array_equal(cpu["index"], dev["index"]) and np.array_equal(cpu["label"], dev["label"])
    assert dev["image"].dtype == torch.uint8 and dev["image"].shape == (len(rows), 3, 32, 32)
    diff = (torch.from_numpy(cpu["image"]).float() - dev["image"].float()).abs()
    assert diff.mean() < 0.5 and (diff > 2).float().mean() < 0.01, (diff.mean(), (diff > 2).float().mean())
    none = da.device_decode_augment(batch, tf, CPU, rows=np.array([1, 3]))  # odd indices: no row kept
    assert none["image"].shape == (0, 3, 32, 32) and len(none["label"]) == 0


def test_the_device_path_runs_only_the_lists_it_can_and_checks_headers():
    assert da.device_steps(_specs("imagenet")) is not None
    assert da.device_steps(resolve_augment(None, "cifar", 32, [(32, 32)])) is None  # RandomCrop + flip
    assert da.device_steps(_specs([{"RandomResizedCrop": {"size": 32, "interpolation": "nearest"}}])) is None
    assert da.device_steps(_specs([{"ColorJitter": {"brightness": 0.4}}, {"RandomResizedCrop": {"size": 32}}])) is None
    assert da.device_steps(_specs([{"RandomResizedCrop": {"size": 32}}, {"RandomGrayscale": {"p": 0.2}}])) is None
    tf = ImageTransform("cifar", 32, resolve_augment(None, "cifar", 32, [(32, 32)]), 0)
    with pytest.raises(ValueError, match="decode: device runs a bilinear RandomResizedCrop"):
        da.device_decode_augment({"image": [b""], "label": [0], "index": [0]}, tf, CPU)
    bomb = b"\xff\xd8\xff\xc0\x00\x11\x08" + (9000).to_bytes(2, "big") * 2 + b"\x03" + b"\x01\x22\x00" * 3
    with pytest.raises(ImageDecodeError, match="9000 x 9000 pixels is over the 40-megapixel limit"):
        da.decode_batch([_jpegs(1)[0], bomb], CPU)
    assert torch.equal(da.decode_batch(_jpegs(1), CPU)[0], decode_rgb(_jpegs(1)[0]))
    assert not da.device_decode_works(CPU)  # auto never decodes on a CPU's "device"


def test_decode_place_resolves_auto_by_device_and_augment_list():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    imagenet, cifar = _specs("imagenet"), resolve_augment(None, "cifar", 32, [(32, 32)])
    assert decode_place("auto", cpu, imagenet) == "worker"
    # A GPU without a working nvJPEG (none here): Ray Data's tasks, as before.
    assert decode_place("auto", gpu, imagenet) == ("device" if da.device_decode_works(gpu) else "ray_data")
    assert decode_place("auto", gpu, cifar) == "ray_data"
    assert decode_place("device", cpu, imagenet) == "device" and decode_place("ray_data", cpu, cifar) == "ray_data"
    with pytest.raises(ValueError, match="decode: device .*RandomCrop"):
        decode_place("device", gpu, cifar)


def test_a_device_epoch_is_the_worker_epoch_on_the_device_and_repeats(tmp_path, ray_local):
    """A JPEG ImageFolder, class directories as published, prepared as the imagenet family: each rank's epoch from
    ``decode: device`` is the ``worker`` epoch's rows in the same order (the same reads and shuffle buffer), its
    pixels within rounding, and built again the same bits."""
    from lade_core.data.prepare import prepare_dataset
    from lade_core.data.prepared import open_prepared
    from lade_core.data.sources import load_image_folder
    from lade_core.train.loop import epoch_batches

    data = _jpegs(90, seed=4, low=36, high=70)
    for split, rows in (("train", range(80)), ("val", range(80, 90))):
        for i in rows:
            path = tmp_path / "folder" / split / f"c{i % 5}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[i])
    prepare_dataset(load_image_folder(tmp_path / "folder", name="jpegs", transform="imagenet"), tmp_path / "out",
                    progress=False)
    prepared = open_prepared(tmp_path / "out")
    augment = resolve_augment(None, "imagenet", 32, prepared.input_sizes(32))

    def epoch(rank: int, device=None) -> list[dict]:
        return list(epoch_batches(prepared, augment, 32, 0, epoch=1, rank=rank, world=2, batch_size=8,
                                  in_worker=True, device=device))

    for rank in (0, 1):
        worker, device = epoch(rank), epoch(rank, CPU)
        assert [len(b["label"]) for b in device] == [len(b["label"]) for b in worker] == [8] * 5
        for a, b in zip(worker, device):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
            assert b["image"].device == CPU and b["image"].dtype == torch.uint8
            assert (a["image"].float() - b["image"].float()).abs().mean() < 0.5
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(device, epoch(rank, CPU)))


def test_decode_device_with_a_list_it_cannot_run_is_refused_before_ray(tmp_path):
    from lade_core.config.recipes import resolve_train_config
    from lade_core.data.prepare import prepare_dataset
    from lade_core.data.prepared import open_prepared
    from lade_core.data.synthetic import make_synthetic
    from lade_core.train.runs import check_against_dataset

    prepare_dataset(make_synthetic(num_classes=3, image_size=16, max_count=8, imbalance_ratio=2, test_per_class=2),
                    tmp_path / "syn")

    def check(**over):
        config = resolve_train_config(None, {"dataset": str(tmp_path / "syn"), "image_size": 16, "synthetic": None,
                                             "batch_size": 4, "decode": "device", **over})
        return check_against_dataset(config, open_prepared(tmp_path / "syn"))

    with pytest.raises(ValueError, match="decode: device runs a bilinear RandomResizedCrop .*RandomCrop"):
        check()  # the synthetic set is the cifar family: RandomCrop + flip
    assert check(augment="imagenet").runtime.decode == "device"
