"""Serve a registered model over HTTP with Ray Serve, its target prior given per request or following the traffic.

  python pipelines/serve.py --model models:/NAME@champion --port 8000 --num-replicas 2
  curl -s localhost:8000/predict -d '{"images": ["<base64 PNG>"], "target_prior": "online", "top_k": 3}'
  curl -s localhost:8000/prior            # the online estimate of p_t, its standard error and sample count
  curl -s -X POST localhost:8000/prior/reset

The application is lade_core.serve.app (also `serve run lade_core.serve.app:app_builder model=...`). Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import sys

from lade_core.runtime.local_ray import init_ray, quiet_logging
from lade_core.serve.app import build_app
from lade_core.tracking.model import load_classifier
from lade_core.tracking.store import resolve_tracking_uri


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION (or runs:/ID/model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-replicas", type=int, default=1, help="replicas, each loading the model once")
    ap.add_argument("--use-gpu", action="store_true", default=None,
                    help="one GPU per replica (default: if the cluster has GPUs)")
    ap.add_argument("--window", type=int, default=500, help="images the online prior estimate rests on")
    ap.add_argument("--warmup", type=int, default=200, help="images before 'online' leaves uniform")
    ap.add_argument("--change-test", default="5", help="standard deviations of the test for a change of mix that "
                    "cuts the online estimate's window to its newest --warmup images (off: never)")
    ap.add_argument("--name", default="lade", help="the Serve application's name (and its online estimate's)")
    ap.add_argument("--mlflow-uri", help="default: sqlite store ./mlflow.db")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs for a local Ray")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--change-test must be a number of standard deviations or off, got {text!r}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_logging(args.verbose)
    tracking_uri = resolve_tracking_uri(args.mlflow_uri)
    try:
        change_test = None if args.change_test.lower() in ("off", "none") else _number(args.change_test)
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        load_classifier(args.model, tracking_uri)  # a bad URI or a foreign model fails here, before Ray starts
        build_app(args.model, tracking_uri, args.num_replicas, False, args.window, args.warmup, change_test,
                  args.name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    init_ray(num_cpus=args.num_cpus, dashboard=True)  # a long-lived service: Serve's view in the dashboard
    use_gpu = args.use_gpu if args.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    app = build_app(args.model, tracking_uri, args.num_replicas, use_gpu, args.window, args.warmup, change_test,
                    args.name)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=args.name, route_prefix="/")
    print(f"serving {args.model} on http://{args.host}:{args.port} ({args.num_replicas} replicas"
          f"{', GPU' if use_gpu else ''}): POST /predict, GET /prior, POST /prior/reset", flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0

