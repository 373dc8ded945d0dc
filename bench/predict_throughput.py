"""predict.py's images/s against a plain PyTorch loop over the same images, same model, same machine, one run.

The model: a ResNet-32 pyfunc logged with ``lade_core.serving.log_classifier`` into a throwaway sqlite store (its
weights don't matter for speed). The images: the test split of a prepared synthetic dataset (32x32 PNG in
Parquet). Plain loop: read the Parquet bytes, decode + center crop + normalize + forward in batches of 64, one
process with all its torch threads. predict.py's path: ``image_dataset`` -> ``predict_images`` -> ``finish``
(target prior, top-5), timed end to end after Ray has started and the driver has loaded the model (as predict.py
does before Ray starts): with predict.py's default (``model_actors``: on one CPU node, the driver itself), and on
an actor pool of 1 and of 2 actors that each load the model once. All produce the same labels (checked).
Run: python bench/predict_throughput.py [--smoke-test]; prints ``predict/plain <ratio>`` last.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import mlflow

    from lade_core.data.prepare import prepare_dataset
    from lade_core.data.prepared import open_prepared
    from lade_core.data.synthetic import make_synthetic
    from lade_core.models import build_model
    from lade_core.posthoc import posthoc_offset
    from lade_core.prediction import finish, image_dataset, model_actors, predict_images
    from lade_core.priors import uniform_prior
    from lade_core.runtime import init_ray
    from lade_core.serving import LadeClassifier, ModelCard, log_classifier

    per_class = 20 if args.smoke_test else 2000
    with tempfile.TemporaryDirectory() as d:
        init_ray(num_cpus=4)
        prepare_dataset(make_synthetic(num_classes=10, max_count=40, imbalance_ratio=4, val_per_class=2,
                                       test_per_class=per_class), Path(d) / "data", num_cpus=4)
        prepared = open_prepared(Path(d) / "data")
        uri = f"sqlite:///{d}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        card = ModelCard("resnet32", 10, [f"class_{c}" for c in range(10)], prepared.source_prior.tolist(), "lade",
                         "cifar", 32, None)
        torch.manual_seed(0)
        with mlflow.start_run():
            model_uri = log_classifier(card, build_model("resnet32", 10).state_dict(), "model").model_uri

        # The plain loop: the same decode + eval transform + forward that the pyfunc runs, without Ray.
        images = prepared.raw_split("test", ["image"]).column("image").to_pylist()
        n = len(images)
        clf = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        assert isinstance(clf, LadeClassifier)
        t0 = time.perf_counter()
        plain = []
        for start in range(0, n, 64):
            x, _, _ = clf.preprocess(pd.DataFrame({"image": images[start:start + 64]}), False)
            plain.append(clf.logits(x).argmax(1))
        plain_s = time.perf_counter() - t0
        plain_labels = torch.cat(plain).numpy()

        offset = posthoc_offset("inject", card.source_prior, uniform_prior(10), 10)
        times = {}
        default = model_actors(None, gpus=0, nodes=1, use_gpu=False)
        for workers in ("default", 1, 2):
            t0 = time.perf_counter()
            ds = image_dataset(Path(d) / "data", card.class_names, split="test")
            logits = predict_images(ds, clf, model_uri, uri, num_actors=default if workers == "default" else workers,
                                    use_gpu=False, batch_size=64, skip_bad=False, cpus=4)
            table = finish(logits, offset, 5, card.class_names)
            times[workers] = time.perf_counter() - t0
            order = prepared.raw_split("test", ["index"]).column("index").to_numpy()
            got = table.column("label").to_numpy()  # sorted by index; the plain loop ran in file order
            assert (got[order] == plain_labels).mean() > 0.99, "predict.py and the plain loop disagree"
    print(f"{n} images, ResNet-32 at 32x32, CPU ({os.cpu_count()} cores)")
    print(f"plain PyTorch loop: {n / plain_s:.0f} images/s")
    for w, s in times.items():
        what = f"default ({default} actors: the driver)" if w == "default" else f"{w} actor{'s' if w > 1 else ''}"
        print(f"predict.py, {what}: {n / s:.0f} images/s  ({plain_s / s:.2f} of plain)")
    print(f"predict/plain {plain_s / times['default']:.2f}")
    print(f"predict_2actors/plain {plain_s / times[2]:.2f}")


if __name__ == "__main__":
    main()
