"""Step 2 of batch prediction (``prediction.top_k_batch``): raw logits + the post-hoc offset -> labels and top-k,
checked against Eq. 17 / Eq. 6 written here; where step 1 runs (``model_actors``, ``step1_placement``) and its input
read in the driver (``image_batches``). No Ray."""
import os

import numpy as np
import pytest
import torch

from lade_core.math.posthoc import posthoc_offset
from lade_core.serve.predict import UNKNOWN, image_batches, model_actors, step1_placement, top_k_batch

NAMES = ["a", "b", "c", "d"]


def _batch(logits: np.ndarray) -> dict:
    n = len(logits)
    return {"row": np.arange(n), "path": np.array([f"x{i}" for i in range(n)]), "true_label": np.full(n, UNKNOWN),
            "logits": logits, "error": np.array(["" if np.isfinite(r).all() else "does not decode" for r in logits],
                                                dtype=object)}


def test_a_target_prior_with_a_zero_entry_predicts_every_decoded_image():
    """A class the target never holds gets probability 0; the other classes follow Eq. 17 renormalized. Rows that
    did not decode (NaN logits from pass 1) stay unknown."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 4)).astype(np.float32)
    logits[3] = np.nan
    logits[0] = [5.0, 0.0, 0.0, 0.0]  # its raw argmax is the class the target prior knocks out
    ps = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    for rule in ("inject", "pc"):
        for pt in (torch.tensor([0.0, 0.5, 0.3, 0.2], dtype=torch.float64),
                   torch.full((4,), 0.25, dtype=torch.float64)):
            out = top_k_batch(_batch(logits), posthoc_offset(rule, ps, pt, 4).numpy(), 4, NAMES)
            z = torch.from_numpy(logits.astype(np.float64)) + torch.log(pt) - (torch.log(ps) if rule == "pc" else 0)
            expected = torch.softmax(z, 1)
            for i in range(6):
                if i == 3:
                    assert out["label"][i] == UNKNOWN and out["top_k_labels"][i] is None
                    assert np.isnan(out["probability"][i])
                    continue
                assert out["label"][i] == int(expected[i].argmax()) and out["class_name"][i] == NAMES[out["label"][i]]
                np.testing.assert_allclose(out["top_k_probabilities"][i], expected[i][out["top_k_labels"][i]].numpy(),
                                           rtol=1e-12)
                if pt[0] == 0:
                    assert out["label"][i] != 0 and out["top_k_labels"][i][-1] == 0
                    assert out["top_k_probabilities"][i][-1] == 0


def test_model_actors_follow_the_cluster_unless_asked():
    """One actor per GPU, one per node on a multi-node CPU cluster, none (the driver) on one CPU node; an explicit
    count always wins, 0 included."""
    assert model_actors(None, gpus=4, nodes=2, use_gpu=True) == 4
    assert model_actors(None, gpus=0, nodes=3, use_gpu=False) == 3
    assert model_actors(None, gpus=0, nodes=1, use_gpu=False) == 0
    assert model_actors(None, gpus=2, nodes=1, use_gpu=False) == 0  # --use-gpu off on a GPU node: CPU, the driver
    assert model_actors(2, gpus=0, nodes=1, use_gpu=False) == 2 and model_actors(0, gpus=8, nodes=4, use_gpu=True) == 0


def test_image_batches_read_a_folder_in_this_process_as_the_ray_dataset_does(tmp_path):
    """Without Ray (the driver's input where the model runs in the driver): every image of the folder once, in
    batches of the asked size, in path order, its bytes as stored, the class folder as its true label (else
    unknown)."""
    files = {}
    for k, name in enumerate(NAMES[:3]):
        (tmp_path / name).mkdir()
        for j in range(k + 2):  # 2, 3, 4 images: 9 in all
            path = tmp_path / name / f"{j}.png"
            path.write_bytes(bytes([k, j]) * 10)
            files[str(path)] = (bytes([k, j]) * 10, k)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.jpg").write_bytes(b"jpeg?")
    files[str(tmp_path / "other" / "x.jpg")] = (b"jpeg?", UNKNOWN)
    batches = list(image_batches(tmp_path, NAMES, batch_size=4))
    assert [len(b["row"]) for b in batches] == [4, 4, 2]
    rows = np.concatenate([b["row"] for b in batches])
    assert rows.tolist() == list(range(10))
    got = {p: (bytes(im), int(y)) for b in batches for p, im, y in zip(b["path"], b["image"], b["true_label"])}
    assert got == files


def test_one_node_without_gpus_predicts_without_starting_ray(monkeypatch):
    """No RAY_ADDRESS, no GPU, no actors asked for: the model runs in this process and Ray never starts."""
    import ray

    if torch.cuda.device_count():
        pytest.skip("this machine has GPUs: step 1 runs on actors")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    try:
        actors, use_gpu, cpus = step1_placement(None, None, 4)
        assert (actors, use_gpu) == (0, False) and cpus == os.cpu_count()
        assert step1_placement(0, None, 4)[0] == 0
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
