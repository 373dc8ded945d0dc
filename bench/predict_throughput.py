"""predict.py's images/s against a plain PyTorch loop over the same images, same model, same machine, one run.

The model: a ResNet-32 pyfunc logged with ``lade_core.tracking.model.log_classifier`` into a throwaway sqlite store (its
weights don't matter for speed). The images: the test split of a prepared synthetic dataset (32x32 PNG in
Parquet). Plain loop: decode + center crop + normalize + forward over the Parquet bytes already in memory, in
batches of 64, one process with all its torch threads. predict.py's path: ``predict_images`` -> ``finish`` (target
prior, top-5), timed end to end after the driver has loaded the model (as predict.py does first): with predict.py's
default (``model_actors``: on one CPU node, the driver itself, reading the Parquet itself), the two timed without
Ray running (as predict.py's default starts none), alternating, best of 2; then, on a local Ray, an actor pool of
1 and of 2 actors that each load the model once (Ray Data reading). All produce
the same labels (checked).
Run: python bench/predict_throughput.py [--smoke-test]; prints ``predict/plain <ratio>`` last.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import mlflow

    from lade_core import __version__
    from lade_core.data.prepare import prepare_dataset
    from lade_core.data.prepared import open_prepared
    from lade_core.data.synthetic import make_synthetic
    from lade_core.math.posthoc import posthoc_offset
    from lade_core.math.priors import uniform_prior
    from lade_core.models.backbones import build_model
    from lade_core.runtime.local_ray import init_ray
    from lade_core.serve.predict import finish, model_actors, predict_images
    from lade_core.tracking.model import LadeClassifier, ModelCard, log_classifier

    per_class = 20 if args.smoke_test else 2000
    with tempfile.TemporaryDirectory() as d:
        init_ray(num_cpus=4)
        prepare_dataset(make_synthetic(num_classes=10, max_count=40, imbalance_ratio=4, val_per_class=2,
                                       test_per_class=per_class), Path(d) / "data", num_cpus=4)
        prepared = open_prepared(Path(d) / "data")
        uri = f"sqlite:///{d}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        card = ModelCard("resnet32", 10, [f"class_{c}" for c in range(10)], prepared.source_prior.tolist(), "lade",
                         "cifar", 32, None, lade_version=__version__)  # as train.py's card: no old-model note
        torch.manual_seed(0)
        with mlflow.start_run():
            model_uri = log_classifier(card, build_model("resnet32", 10).state_dict(), "model").model_uri

        import ray

        # predict.py's default on one CPU node starts no Ray: the plain loop and it are timed without one, twice
        # each, alternating (best of 2); the actor pools on a Ray started afterwards.
        ray.shutdown()
        images = prepared.raw_split("test", ["image"]).column("image").to_pylist()
        n = len(images)
        clf = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        assert isinstance(clf, LadeClassifier)
        offset = posthoc_offset("inject", card.source_prior, uniform_prior(10), 10)
        order = prepared.raw_split("test", ["index"]).column("index").to_numpy()
        default = model_actors(None, gpus=0, nodes=1, use_gpu=False)

        def plain_loop() -> np.ndarray:
            """The same decode + eval transform + forward that the pyfunc runs, over bytes already in memory."""
            labels = []
            for start in range(0, n, 64):
                x, _, _ = clf.preprocess(pd.DataFrame({"image": images[start:start + 64]}), False)
                labels.append(clf.logits(x).argmax(1))
            return torch.cat(labels).numpy()

        def predict_py(actors: int) -> np.ndarray:
            logits = predict_images(Path(d) / "data", card.class_names, clf, model_uri, uri, split="test",
                                    num_actors=actors, use_gpu=False, batch_size=64, skip_bad=False, cpus=4)
            return finish(logits, offset, 5, card.class_names).column("label").to_numpy()[order]  # file order

        times = {}
        plain_labels = None
        runs = [("plain", plain_loop), ("default", lambda: predict_py(default))] * 2
        runs += [(1, lambda: predict_py(1)), (2, lambda: predict_py(2))]
        for name, fn in runs:
            if name == 1:
                init_ray(num_cpus=4)
            t0 = time.perf_counter()
            labels = fn()
            times[name] = min(times.get(name, math.inf), time.perf_counter() - t0)
            plain_labels = labels if plain_labels is None else plain_labels
            assert (labels == plain_labels).mean() > 0.99, f"predict.py ({name}) and the plain loop disagree"
        plain_s = times.pop("plain")
    print(f"{n} images, ResNet-32 at 32x32, CPU ({os.cpu_count()} cores)")
    print(f"plain PyTorch loop: {n / plain_s:.0f} images/s")
    for w, s in times.items():
        what = f"default ({default} actors: the driver)" if w == "default" else f"{w} actor{'s' if w > 1 else ''}"
        print(f"predict.py, {what}: {n / s:.0f} images/s  ({plain_s / s:.2f} of plain)")
    print(f"predict/plain {plain_s / times['default']:.2f}")
    print(f"predict_2actors/plain {plain_s / times[2]:.2f}")


if __name__ == "__main__":
    main()
