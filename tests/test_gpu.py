"""The GPU path: LADE under bf16 autocast on CUDA, and a DDP training epoch over NCCL. Skipped without CUDA."""
import math

import pytest
import torch
import torch.distributed as dist

from lade_core.config.schema import OptimizerConfig
from lade_core.math.losses import LADELoss
from lade_core.models.backbones import build_model
from lade_core.serve.inference import predict_logits
from lade_core.train.loop import build_optimizer, train_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
C = 10


def _prior():
    counts = torch.tensor([100 * 0.1 ** (k / (C - 1)) for k in range(C)], dtype=torch.float64)
    return counts / counts.sum()


def _lade_reference(z, y, p, alpha, lam):
    """Eq. 19 + alpha * Eq. 15-16 (released estimator), float64 loops written from the equations."""
    n = z.shape[0]
    ce = -sum(z[i, y[i]] + math.log(p[y[i]]) - torch.logsumexp(z[i] + p.log(), 0) for i in range(n)) / n
    lader = 0.0
    for c in range(C):
        members = [i for i in range(n) if y[i] == c]
        first = sum(z[i, c] for i in members) / max(len(members), 1)
        second = torch.logsumexp(z[:, c] + math.log(1 / C) - math.log(p[c]), 0) - math.log(n)
        lader = lader - p[c] * (first - second - lam * second**2)
    return ce + alpha * lader


def test_lade_on_bf16_autocast_logits_matches_float64():
    torch.manual_seed(0)
    x = torch.randn(64, 32, device="cuda")
    y = torch.randint(0, C, (64,), device="cuda")
    head = torch.nn.Linear(32, C).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = head(x)  # [64, C] bf16
    assert logits.dtype == torch.bfloat16
    logits.retain_grad()
    loss = LADELoss(_prior(), alpha=0.5, lam=0.2).cuda()(logits, y)
    assert loss.dtype == torch.float32  # reductions are promoted out of bf16
    loss.backward()
    z64 = logits.detach().double().cpu().requires_grad_()
    ref = _lade_reference(z64, y.cpu().tolist(), _prior(), 0.5, 0.2)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    # The gradient flowing into the bf16 logits is the float32 gradient rounded to bf16.
    assert torch.allclose(logits.grad.double().cpu(), z64.grad, atol=2e-3, rtol=1e-2)


def test_train_one_epoch_nccl_ddp_with_amp(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        model = build_model("resnet32", C).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        optimizer = build_optimizer(ddp.module, OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
        criterion = LADELoss(_prior(), alpha=0.1, lam=0.01).to(device)
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, C, (256,), generator=g)
        images = torch.randn(256, 3, 32, 32, generator=g) * 0.5 + labels[:, None, None, None] * 0.3 / C
        batches = [{"image": images[i:i + 64].to(device), "label": labels[i:i + 64], "index": torch.arange(i, i + 64)}
                   for i in range(0, 256, 64)]  # as model_batches yields them: images already on the device
        first = train_one_epoch(ddp, criterion, optimizer, batches, device, amp=True)
        for _ in range(4):
            last = train_one_epoch(ddp, criterion, optimizer, batches, device, amp=True)
        for k in ("train/loss", "train/lade_ce", "train/lader"):
            assert math.isfinite(first[k]) and math.isfinite(last[k])
        assert last["train/loss"] < first["train/loss"]  # it learns under bf16 autocast
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
        logits, out_labels, index = predict_logits(model, batches)
        assert logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.shape == (256, C)
        assert torch.equal(out_labels, labels) and torch.equal(index, torch.arange(256))
    finally:
        dist.destroy_process_group()


def test_lade_step_on_the_gpu_makes_no_host_sync():
    """The loss's label check and class counts stay on the device: a forward + backward never waits on the host
    (the known cause of LADE's 4.7x CE at N = 2048, C = 8142 on an H100, bench/README.md)."""
    device = torch.device("cuda")
    criterion = LADELoss(_prior(), alpha=0.1, lam=0.01).to(device)
    z = torch.randn(256, C, device=device, requires_grad=True)
    y = torch.randint(0, C, (256,), device=device)
    criterion(z, y).backward()  # warm-up: caches of the prior buffers in the logits' dtype
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        criterion(z, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_nvjpeg_and_the_batched_augmentation_on_the_gpu_match_the_cpu_path():
    """``decode: device`` on a GPU: nvJPEG works (so ``auto`` picks it for the imagenet preset), its batched resample
    matches torch's CUDA resize, and a chunk's images are within rounding of the CPU path's from the same seeds."""
    import io

    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from lade_core.data import decode_place
    from lade_core.data import device_augment as da
    from lade_core.data.augment import augment_seed, resolve_augment
    from lade_core.data.transforms import ImageTransform, decode_augment

    device = torch.device("cuda", 0)
    specs = resolve_augment("imagenet", "imagenet", 224, [(256, 340)])
    assert da.device_decode_works(device) and decode_place("auto", device, specs) == "device"
    rng, data = np.random.default_rng(0), []
    for i in range(32):
        h, w = 200 + 7 * i, 500 - 5 * i
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        coarse.save(buf, format="JPEG", quality=90)
        data.append(buf.getvalue())
    images = da.decode_batch(data, device)
    assert all(im.device == device and im.shape[0] == 3 for im in images)
    boxes = [(3, 5, im.shape[1] - 10, im.shape[2] - 20) for im in images]
    out = da.resample_crops(images, boxes, [224, 224], True)
    ref = torch.stack([F.resized_crop_image(im.float(), *b, size=[224, 224], antialias=True).round()
                       for im, b in zip(images, boxes)])
    assert (out - ref).abs().max() <= 1
    tf = ImageTransform("imagenet", 224, specs, augment_seed(0, 1))
    batch = {"image": np.array(data, dtype=object), "label": np.arange(32), "index": np.arange(32)}
    gpu = da.device_decode_augment(batch, tf, device)["image"].cpu().float()
    cpu = torch.from_numpy(decode_augment(batch, tf)["image"]).float()
    assert (gpu - cpu).abs().mean() < 1.0
