"""The registered model as a Ray Serve application whose target prior can follow the traffic.

    POST /predict      {"images": [<base64>, ...], "target_prior": [C floats] | "uniform" | "online",
                        "output": "label" | "probabilities" | "logits", "top_k": k, "skip_bad": false}
                    -> {"predictions": [{"label", "class_name", <output>, "top_k", "error"}, ...], "prior": ...}
    GET  /prior        the online estimate: {"prior": [C], "std": [C], "n": images in its window, "seen", "trusted"}
    POST /prior/reset  forget the traffic seen so far

Each replica loads the model once, with lade's own loader (card and weights: nothing the registry stores runs,
``serving.load_classifier``), on a GPU when it has one, and batches concurrent requests into one forward pass
(``serve.batch``). The online estimate is one named Ray actor (``PriorActor``) shared by every replica: each request's
calibrated source posteriors (the card's BCTS) update it, and ``"online"`` answers with the estimate held before the
request, uniform until it is ``trusted`` (``label_shift.OnlinePrior``). Bad input is a 400 with one line naming it.

``pipelines/serve.py`` runs it; ``serve run lade_core.serve.app:app_builder model=models:/NAME@ALIAS`` or a Serve
config file's ``import_path: lade_core.serve.app:app_builder`` (``args``: the keyword arguments of ``build_app``).
"""
from __future__ import annotations

import base64
import binascii
import json

import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from lade_core.math.label_shift import Calibration, OnlinePrior, calibrate, source_logits
from lade_core.math.posthoc import posthoc_logits
from lade_core.math.priors import uniform_prior
from lade_core.tracking.model import MAX_ROWS, OUTPUTS, decode_images, load_classifier

PRIOR_NAMESPACE = "lade-serve"
REQUEST_KEYS = ("images", "target_prior", "output", "top_k", "skip_bad")


@ray.remote(num_cpus=0)
class PriorActor:
    """The one online estimate of an application, shared by its replicas (``OnlinePrior``)."""

    def __init__(self, source_prior: list[float], window: int, warmup: int, change_test: float | None):
        self.online = OnlinePrior(source_prior, window=window, warmup=warmup, change_test=change_test)

    def current(self) -> tuple[list[float] | None, dict]:
        """(the estimate to answer with, or None while it is not trusted; its state)."""
        return (self.online.prior.tolist() if self.online.trusted else None), self.online.state()

    def update(self, posteriors) -> None:
        self.online.update(torch.as_tensor(posteriors))

    def state(self) -> dict:
        return self.online.state()

    def reset(self) -> dict:
        self.online.reset()
        return self.online.state()


class BadRequest(ValueError):
    """The caller's payload: answered with 400 and this one line."""


def parse_request(body: bytes, num_classes: int) -> dict:
    """A /predict payload checked: every bad field is one error naming it, before any compute."""
    try:
        req = json.loads(body or b"null")
    except json.JSONDecodeError as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object with an 'images' list")
    unknown = sorted(set(req) - set(REQUEST_KEYS))
    if unknown:
        raise BadRequest(f"unknown keys {unknown}; a request takes {list(REQUEST_KEYS)}")
    images = req.get("images")
    if not isinstance(images, list) or not images:
        raise BadRequest("images must be a non-empty list of base64-encoded images")
    if len(images) > MAX_ROWS:
        raise BadRequest(f"{len(images)} images in one request; at most {MAX_ROWS} (LADE_MAX_ROWS_PER_REQUEST)")
    raw = []
    for i, s in enumerate(images):
        try:
            if not isinstance(s, str):
                raise TypeError
            raw.append(base64.b64decode(s, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise BadRequest(f"images[{i}] is not a base64 string") from None
    prior = req.get("target_prior", "uniform")
    if not (prior in ("uniform", "online") or isinstance(prior, list)):
        raise BadRequest(f"target_prior must be a list of {num_classes} probabilities, 'uniform' or 'online'; "
                         f"got {prior!r}")
    output = req.get("output", "probabilities")
    if output not in OUTPUTS:
        raise BadRequest(f"output {output!r}: choose one of {list(OUTPUTS)}")
    top_k = req.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_classes):
        raise BadRequest(f"top_k must be an integer in [1, {num_classes}], got {top_k!r}")
    skip_bad = req.get("skip_bad", False)
    if not isinstance(skip_bad, bool):
        raise BadRequest(f"skip_bad must be true or false, got {skip_bad!r}")
    return {"images": raw, "target_prior": prior, "output": output, "top_k": top_k, "skip_bad": skip_bad}


@serve.deployment(name="lade", max_ongoing_requests=64)
class LadeServer:
    def __init__(self, model_uri: str, tracking_uri: str | None, prior_name: str, window: int, warmup: int,
                 change_test: float | None):
        self.model = load_classifier(model_uri, tracking_uri)  # once per replica
        card = self.model.card
        self.calibration = Calibration.from_dict(card.calibration) if card.calibration else None
        # Ray-specific: the application's one estimate, created by whichever replica comes first.
        self.prior = PriorActor.options(name=prior_name, namespace=PRIOR_NAMESPACE, get_if_exists=True,
                                        lifetime="detached").remote(card.source_prior, window, warmup, change_test)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def batched_logits(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Concurrent requests' images [n_i, 3, S, S] in one forward pass; each request's raw logits back."""
        z = self.model.logits(torch.cat(inputs))
        return list(z.split([len(x) for x in inputs]))

    async def __call__(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path.endswith("/predict") and method == "POST":
                return JSONResponse(await self.predict(await request.body()))
            if path.endswith("/prior/reset") and method == "POST":
                return JSONResponse(await self.prior.reset.remote())
            if path.endswith("/prior") and method == "GET":
                return JSONResponse(await self.prior.state.remote())
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"error": f"no route {method} {path}: POST /predict, GET /prior, POST /prior/reset"},
                            status_code=404)

    async def predict(self, body: bytes) -> dict:
        card = self.model.card
        req = parse_request(body, card.num_classes)
        images, errors = decode_images(req["images"])
        if errors and not req["skip_bad"]:
            shown = "; ".join(f"images[{i}]: {e}" for i, e in list(errors.items())[:3])
            raise BadRequest(f"{len(errors)} of {len(images)} images do not decode ({shown}); pass skip_bad to answer "
                             "the rest")
        ok = [i for i, im in enumerate(images) if im is not None]
        mode, given = req["target_prior"], None
        if mode not in ("uniform", "online"):
            try:
                given = self.model.check_params({"target_prior": mode})["target_prior"]  # float64 [C], checked
            except ValueError as e:
                raise BadRequest(str(e)) from None
        online, state = await self.prior.current.remote()
        z = await self.batched_logits(self.model.preprocess_images([images[i] for i in ok])) if ok else \
            torch.zeros(0, card.num_classes)
        ps = self.model.source_prior
        posteriors = calibrate(source_logits(z, ps, rule=card.posthoc), self.calibration)  # p_s(y|x), the card's BCTS
        self.prior.update.remote(posteriors.numpy())  # the traffic informs the estimate; not awaited
        if given is not None:
            target, used = given, "given"
        elif mode == "online" and online is not None:
            target, used = torch.tensor(online, dtype=torch.float64), "online"
        else:  # uniform, or online while the estimate warms up
            target, used = uniform_prior(card.num_classes), "uniform" if mode == "uniform" else \
                "uniform (online estimate warming up)"
        zt = posthoc_logits(z.double(), card.posthoc, ps, target)
        return {"predictions": self.rows(zt, ok, errors, len(images), req), "prior": {"used": used, "online": state}}

    def rows(self, zt: torch.Tensor, ok: list[int], errors: dict[int, str], n: int, req: dict) -> list[dict]:
        names = self.model.card.class_names
        out: list[dict] = [{"label": -1, "class_name": None, "error": errors.get(i)} for i in range(n)]
        probs = torch.softmax(zt, 1)
        for row, zr, pr in zip(ok, zt, probs):
            label = int(zr.argmax())
            entry = {"label": label, "class_name": names[label], "error": None}
            if req["output"] == "probabilities":
                entry["probabilities"] = pr.tolist()
            elif req["output"] == "logits":  # -inf (a class with p_t = 0) as null: JSON has no infinities
                entry["logits"] = [v if v > -float("inf") else None for v in zr.tolist()]
            if req["top_k"]:
                top = pr.topk(req["top_k"])
                entry["top_k"] = [{"label": int(k), "class_name": names[int(k)], "probability": float(v)}
                                  for v, k in zip(top.values, top.indices)]
            out[row] = entry
        return out


def build_app(model: str, tracking_uri: str | None = None, num_replicas: int = 1, use_gpu: bool = False,
              window: int = 500, warmup: int = 200, change_test: float | None = 5.0, name: str = "lade"):
    """The application: ``num_replicas`` replicas of ``model`` (one GPU each with ``use_gpu``) sharing the online
    estimate named after ``name`` (``OnlinePrior``'s ``window``, ``warmup`` and ``change_test``)."""
    # The estimate's settings checked before Ray builds anything.
    OnlinePrior([0.5, 0.5], window=window, warmup=warmup, change_test=change_test)
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    return LadeServer.options(num_replicas=num_replicas, ray_actor_options={"num_gpus": 1 if use_gpu else 0}).bind(
        model, tracking_uri, f"{name}-prior", window, warmup, change_test)


def app_builder(args: dict):
    """``serve run lade_core.serve.app:app_builder model=models:/NAME@ALIAS [tracking_uri=...]`` and Serve config
    files: ``args`` are ``build_app``'s keyword arguments (strings from the command line are converted)."""
    kw = dict(args)
    for key in ("num_replicas", "window", "warmup"):
        if key in kw:
            kw[key] = int(kw[key])
    if "change_test" in kw:
        kw["change_test"] = None if str(kw["change_test"]).lower() in ("none", "off") else float(kw["change_test"])
    if "use_gpu" in kw:
        kw["use_gpu"] = str(kw["use_gpu"]).lower() in ("1", "true", "yes")
    return build_app(**kw)
