"""Ray Serve: registry artifacts behind an autoscaling HTTP API (FastAPI ingress).

Where a model version runs (``build_app``):

- **one hop**: an application whose traffic goes to one full model version loads it in the ``Ingress``
  replica itself (HTTP proxy -> that replica), which autoscales as the model's deployment would;
- **its own deployment**: with several versions (canary) or models, each full version is a ``ModelServer``
  deployment behind the ingress, autoscaling on its own (HTTP proxy -> ingress -> model replica);
- **shared**: variants of one base (LoRA adapters, heads on a frozen backbone: ``ptm_ray.variants``) share a
  ``VariantServer`` deployment that holds the base once per replica and loads variants on demand (Ray Serve
  model multiplexing, routed by the version's id, least recently used evicted).

The ingress validates requests, checks the optional API key and splits traffic between versions of a model by
weight (canary). Batched tasks share forward passes between concurrent requests without waiting for a batch to
fill (``_Batcher``). The preprocessing is the artifact's own (tokenizer, image transform, audio resampling), so
a served prediction equals ``load_artifact(path).predict`` for the same input.

Routes: ``GET /healthz`` (liveness), ``GET /readyz`` (every model answers), ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}/predict``,
``POST /v1/models/{name}/versions/{version}/predict``, the OpenAPI schema at ``/openapi.json``, and its pages
``/docs`` (Swagger UI) and ``/redoc``, whose JS/CSS the app serves itself (no CDN: clusters often have no internet).

``build_app(args)`` is the import path for ``serve deploy``; ``deploy(cfg)`` runs it from a config.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation of the
# class-based routes, or it takes ``request`` for a query parameter.
import base64
import binascii
import functools
import hashlib
import hmac
import os
import random
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from ray import serve

from ptm_ray.checkpoint import load_artifact
from ptm_ray.config import Config, ServeConfig
from ptm_ray.model_store import ModelStore
from ptm_ray.request_limits import InputError, TooLarge, cap_text, probe_audio, probe_image, read_limited
from ptm_ray.tasks import Task, task_for

__all__ = ["Ingress", "ModelServer", "VariantServer", "app_args", "build_app", "deploy", "write_serve_config"]


class PredictRequest(BaseModel):
    """JSON body of a predict call: text as strings; images and audio as base64-encoded files."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[StrictStr] = Field(min_length=1, description="texts, or base64 image/audio files")
    top_k: int | None = Field(default=None, ge=1, le=1000,
                              description="labels per input, for models that rank labels (default: serve.top_k)")
    parameters: dict[str, Any] | None = Field(
        default=None, description="the model's task options (e.g. top_k, threshold, score_threshold, max_boxes, "
        "max_new_tokens, num_beams, do_sample, temperature, top_p, seed), bounded by the server's limits")


class ErrorBody(BaseModel):
    """Every error's JSON body: what was wrong and where; some errors add fields (``known``, ``errors``)."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="what was wrong and where, e.g. \"inputs[0]: not decodable as an image\"")


_STATUSES = {400: "the body is not valid JSON, or a malformed multipart body",
             401: "missing or wrong API key (when the server requires one)",
             404: "unknown model, or a version of it that is not deployed",
             413: "the body, the number of inputs, an image's pixels or a clip's length exceeds a limit",
             415: "a multipart upload sent to a text model",
             422: "the body or an input does not validate (field, base64, undecodable file, option out of bounds)",
             503: "the model is busy (its queue is full) or the prediction took too long: retry after Retry-After"}


def _documented(*statuses: int) -> dict[int, dict[str, Any]]:
    """The ``responses`` of a route: each error status it can answer, with the body it answers with."""
    return {status: {"model": ErrorBody, "description": _STATUSES[status]} for status in statuses}


_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1},
        "parameters": {"type": "string", "description": "task options as a JSON object"}}}}}}}


class ApiError(Exception):
    """A client error: becomes a JSON response with this status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.detail = status, message, headers, detail


class _Batcher:
    """Continuous batching: a forward pass takes every input queued when it starts, up to ``max_batch_size``.

    Nothing waits for a batch to fill. One request alone runs at once; under load the inputs that arrive while a
    pass runs (off the event loop, in a thread) make the next pass, so batches grow with the load by themselves.
    Inputs of different keys (variants on a shared base) never share a pass. Texts are sorted by length and cut
    into buckets whose longest input is at most twice the shortest, so a pass pads to about its own length.
    ``run(key, inputs)`` returns one result per input; passes run one at a time (a tokenizer's padding and
    truncation settings are shared state: two threads using it at once corrupt batches).
    """

    def __init__(self, run: Any, max_batch_size: int, observe: Any = None, text: Any = None) -> None:
        import collections

        self.run, self.max_batch_size, self.observe = run, max_batch_size, observe
        self.text = text or (lambda item: item)  # the text of an input (to bucket by its length)
        self.pending: collections.deque = collections.deque()
        self.worker: Any = None

    async def submit(self, key: Any, inputs: list[Any]) -> list[Any]:
        import asyncio

        done = asyncio.get_running_loop().create_future()
        self.pending.append((key, list(inputs), done))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        while self.pending:
            taken, size = [], 0
            while self.pending and (not taken or size + len(self.pending[0][1]) <= self.max_batch_size):
                taken.append(self.pending.popleft())
                size += len(taken[-1][1])
            try:
                for key in dict.fromkeys(entry[0] for entry in taken):
                    await self._run_key(key, [entry for entry in taken if entry[0] == key])
            except Exception as e:  # never leave a request waiting for a future nobody will resolve
                for _, _, done in taken:
                    if not done.done():
                        done.set_exception(e)

    async def _run_key(self, key: Any, entries: list[tuple[Any, list[Any], Any]]) -> None:
        import asyncio

        inputs = [item for _, items, _ in entries for item in items]
        results: list[Any] = [None] * len(inputs)
        try:
            for bucket in _length_buckets([self.text(item) for item in inputs]):
                if self.observe:
                    self.observe(len(bucket))
                outputs = await asyncio.to_thread(self.run, key, [inputs[i] for i in bucket])
                for i, output in zip(bucket, outputs):
                    results[i] = output
        except Exception as e:  # every request of this pass hears it (each is a 500 or a clean error upstream)
            for _, _, done in entries:
                if not done.done():
                    done.set_exception(e)
            return
        start = 0
        for _, items, done in entries:
            if not done.done():  # a caller that gave up (timeout) has cancelled its future
                done.set_result(results[start:start + len(items)])
            start += len(items)


def _length_buckets(inputs: list[Any], shortest: int = 32) -> list[list[int]]:
    """Indices of ``inputs`` in passes: texts by length, a new pass where one would be over twice the first's
    length (texts up to ``shortest`` characters count as that long); other inputs in one pass."""
    if not inputs or not all(isinstance(x, str) for x in inputs):
        return [list(range(len(inputs)))]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    buckets: list[list[int]] = [[]]
    for i in order:
        if buckets[-1] and len(inputs[i]) > 2 * max(len(inputs[buckets[-1][0]]), shortest):
            buckets.append([])
        buckets[-1].append(i)
    return buckets


class _Predictor:
    """One loaded artifact answering requests: batched tasks (``Task.batched``) share forward passes between
    concurrent requests (``_Batcher``), then shape each input's prediction with its own request's options; any
    other task answers one request at a time (requests differ in their options: beams, sampling, thresholds)."""

    def __init__(self, path: str, max_batch_size: int) -> None:
        import asyncio

        import ray

        from ptm_ray.inference import serving_device

        self.artifact = load_artifact(path, device=serving_device(ray.get_gpu_ids()))  # cuda under serve.num_gpus > 0
        self.task = task_for(self.artifact.task_name)
        self.batcher = _Batcher(lambda artifact, items: _outputs(self.artifact, self.task, items), max_batch_size,
                                _batch_size_metric(path))
        self.one_at_a_time = asyncio.Lock()

    async def predict(self, items: list[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
        """Predictions for one request's inputs, as ``ptm_ray.inference.predict`` makes them offline."""
        import asyncio

        if self.task.batched:
            results = await self.batcher.submit(None, items)
            return [self.task.format(output, self.artifact, **options) | notes for output, notes in results]
        async with self.one_at_a_time:  # off the event loop, but never two at once (shared tokenizer state)
            return await asyncio.to_thread(self._predict_whole, items, options)

    def _predict_whole(self, items: list[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
        with self.artifact.autocast():
            predictions = self.task.predict(self.artifact, items, **options)
        return [p | notes for p, notes in zip(predictions, self.artifact.preprocessor.notes(items))]


def _outputs(artifact: Any, task: Task, items: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(the task's output, preprocessing notes) per input, from one forward pass."""
    with artifact.autocast():
        outputs = task.outputs(artifact, items)
    return list(zip(outputs, artifact.preprocessor.notes(items)))


def _batch_size_metric(path: str) -> Any:
    """``observe(n)``: the size of each forward pass, as the Ray metric ``ptm_ray_serve_batch_size``."""
    from ray.util.metrics import Histogram

    histogram = Histogram("ptm_ray_serve_batch_size", "inputs per batched forward pass",
                          boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
    tags = {"model": path.rstrip("/").rsplit("/", 2)[-2] + ":" + path.rstrip("/").rsplit("/", 1)[-1]}
    return lambda n: histogram.observe(n, tags=tags)


@serve.deployment
class ModelServer:
    """One model-store version in its own deployment (behind the ingress): see ``_Predictor``."""

    def __init__(self, path: str, max_batch_size: int) -> None:
        self.predictor = _Predictor(path, max_batch_size)

    def ready(self) -> str:
        """The device the model runs on (``cpu``, ``cuda:0``): a replica answers only once ``__init__`` loaded it."""
        return str(self.predictor.artifact.device)

    async def predict(self, items: list[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.predictor.predict(items, options)


@serve.deployment
class VariantServer:
    """Variants of one base (``ptm_ray.variants``) multiplexed on shared replicas: the base once per replica,
    each variant loaded on its first request (``@serve.multiplexed``; Serve routes a variant's requests to
    replicas that hold it) and the least recently used dropped past ``max_variants`` per replica. The model id
    of a request is its version's registry path."""

    def __init__(self, first_path: str, max_batch_size: int, max_variants: int) -> None:
        import ray

        from ptm_ray.config import config_from_dict
        from ptm_ray.data import read_bytes
        from ptm_ray.inference import serving_device
        from ptm_ray.variants import SharedBase

        cfg = config_from_dict(yaml.safe_load(read_bytes(f"{first_path}/config.yaml")))  # model.name, task of the base
        self.shared = SharedBase(cfg, serving_device(ray.get_gpu_ids()))
        # inputs are (variant, input) pairs; those of variants with the same preprocessing share forward passes
        self.batcher = _Batcher(self._outputs, max_batch_size, _batch_size_metric(first_path), text=lambda pair: pair[1])

        async def load(model_id: str) -> Any:
            return await self._load(model_id)

        self.variant = serve.multiplexed(max_num_models_per_replica=max_variants)(load)

    async def _load(self, path: str) -> Any:
        import asyncio

        return await asyncio.to_thread(_load_variant, self.shared, path)

    def ready(self) -> str:
        """The device of the shared base (``cpu``, ``cuda:0``)."""
        return str(self.shared.device)

    def _outputs(self, preprocessing: str, pairs: list[tuple[Any, Any]]) -> list[tuple[Any, dict[str, Any]]]:
        """(output, notes) per (variant, input) pair: one pass for all of them where their heads allow it."""
        import torch

        from ptm_ray.variants import NotMixable

        variants = list(dict.fromkeys(variant for variant, _ in pairs))
        with self.shared.lock:  # never beside a variant's loading or unloading
            if len(variants) == 1:
                return _outputs(variants[0], task_for(variants[0].task_name), [item for _, item in pairs])
            rows = [[i for i, (variant, _) in enumerate(pairs) if variant is v] for v in variants]
            items = [item for _, item in pairs]
            try:
                with torch.no_grad(), variants[0].autocast():
                    logits = self.shared.mixed_logits([v.model for v in variants], variants[0].batch(items), rows)
            except NotMixable:  # one pass per variant
                logits = None
            results: list[Any] = [None] * len(pairs)
            for i, (variant, own) in enumerate(zip(variants, rows)):
                mine = [items[j] for j in own]
                if logits is None:
                    answers = _outputs(variant, task_for(variant.task_name), mine)
                else:
                    scores = task_for(variant.task_name).scores(logits[i][:, :len(variant.labels)])
                    answers = list(zip(scores, variant.preprocessor.notes(mine)))
                for j, answer in zip(own, answers):
                    results[j] = answer
            return results

    async def predict(self, items: list[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
        artifact = await self.variant(serve.get_multiplexed_model_id())
        artifact.hold()
        try:
            results = await self.batcher.submit(artifact.preprocessing, [(artifact, item) for item in items])
        finally:
            await artifact.release()
        task = task_for(artifact.task_name)
        return [task.format(output, artifact, **options) | notes for output, notes in results]


class _VariantArtifact:
    """A variant loaded on a shared base: an ``Artifact`` whose model is a view of the shared base.

    ``@serve.multiplexed`` calls ``__del__`` when it evicts the variant; its adapter leaves the base only once no
    request still holds the variant (``uses``), so an input queued before the eviction still gets its own adapter.
    """

    def __init__(self, artifact: Any, shared: Any, preprocessing: str) -> None:
        import threading

        self.artifact, self.shared, self.counts = artifact, shared, threading.Lock()
        self.preprocessing = preprocessing  # a digest of its preprocessor's files: equal digests share passes
        self.uses, self.evicted, self.unloaded = 0, False, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["artifact"], name)

    def hold(self) -> None:
        with self.counts:
            self.uses += 1

    async def release(self) -> None:
        import asyncio

        with self.counts:
            self.uses -= 1
            idle = self.evicted and self.uses == 0
        if idle:  # off the event loop: unloading waits for the forward pass that may be running
            await asyncio.to_thread(self._unload_if_evicted)

    def __del__(self) -> None:  # Serve's eviction (in a thread), then the garbage collector: once is enough
        if "counts" not in self.__dict__:
            return
        with self.counts:
            if self.unloaded:
                return
            self.evicted = True
        self._unload_if_evicted()

    def _unload_if_evicted(self) -> None:
        with self.shared.lock, self.counts:
            if self.evicted and self.uses == 0 and not self.unloaded:
                self.shared.unload(self.artifact.model)
                self.unloaded = True


def _load_variant(shared: Any, path: str) -> _VariantArtifact:
    """The variant at ``path`` (a registry version) on ``shared``: its preprocessor, labels and config from the
    checkpoint, its model the shared base with its adapters and head."""
    from ray.train import Checkpoint

    from ptm_ray.checkpoint import Artifact, read_meta
    from ptm_ray.config import config_from_dict
    from ptm_ray.models import family_for

    with Checkpoint(path).as_directory() as folder:
        folder = Path(folder)
        meta = read_meta(folder)
        cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
        family = family_for(meta["family"])
        with shared.lock:
            model = shared.load(folder)
        preprocessor = family.load_preprocessor(folder / "preprocessor")
        digest = hashlib.sha256()
        for file in sorted(p for p in (folder / "preprocessor").rglob("*") if p.is_file()):
            digest.update(file.name.encode() + file.read_bytes())
    artifact = Artifact(path, family, model, preprocessor, meta["labels"], cfg, meta, shared.device)
    return _VariantArtifact(artifact, shared, digest.hexdigest())


def _api_key(sv: dict[str, Any]) -> str | None:
    if sv.get("api_key_env"):
        key = os.environ.get(sv["api_key_env"], "")
        if not key:
            raise ValueError(f"serve.api_key_env={sv['api_key_env']}: that environment variable is empty or unset")
        return key
    if sv.get("api_key_file"):
        key = Path(sv["api_key_file"]).expanduser().read_text().strip()
        if not key:
            raise ValueError(f"serve.api_key_file={sv['api_key_file']} is empty")
        return key
    return None


# Helpers the ingress calls are defined above it: ``@serve.ingress`` snapshots the class where it stands, and a
# name defined further down the module is missing in the replica (NameError).
def _replay(request: Request, body: bytes) -> Request:
    """A request whose body is ``body``, already read (and counted) from ``request``'s stream."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


app = FastAPI(title="ptm_ray", description="Fine-tuned pretrained models served by Ray Serve.", version="1",
              docs_url=None, redoc_url=None)  # FastAPI's own pages load their JS from a CDN: see _docs_assets
DOCS_ASSETS = "/docs-assets"
"""Where the app serves Swagger UI's and ReDoc's JS/CSS (package data of fastapi-offline), so the /docs
and /redoc pages render on a cluster without internet."""


def _docs_assets() -> str:
    import importlib.resources

    return str(importlib.resources.files("fastapi_offline") / "static")


app.mount(DOCS_ASSETS, StaticFiles(directory=_docs_assets()), name="docs-assets")


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP API in front of the model versions: validation, auth, canary routing."""

    def __init__(self, models: dict[str, dict[str, Any]], handles: dict[str, Any], settings: dict[str, Any],
                 variant_ids: dict[str, str] | None = None, local: dict[str, str] | None = None,
                 draining: dict[str, Any] | None = None, built_from: dict[str, Any] | None = None) -> None:
        # models: name -> {"versions": {version: {"weight", "meta"}}}; handles: "name:version" -> the handle of
        # its deployment; variant_ids: "name:version" -> its multiplexed model id on a VariantServer; local:
        # "name:version" -> registry path of a version this replica holds itself (one hop); draining: deployments
        # kept for the previous ingress's last requests, never called from here; built_from: the ``app_args`` this
        # application was built from (a failed deploy restores them, see ``deploy``)
        self.models, self.handles, self.settings = models, handles, settings
        self.built_from = built_from
        self.variant_ids = variant_ids or {}
        self.local = {key: _Predictor(path, settings["max_batch_size"]) for key, path in (local or {}).items()}
        # take traffic only once every deployment this ingress routes to has a replica up: a version whose replicas
        # cannot start (a damaged copy on object storage) fails this replica too, and Serve keeps the previous
        # ingress serving instead of routing to nothing (``deploy`` then restores the previous application)
        unique = list({id(h): h for h in handles.values()}.values())
        if unique:  # from worker threads: Serve refuses a blocking handle call on the replica's event loop
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(unique)) as pool:
                list(pool.map(lambda handle: handle.ready.remote().result(), unique))
        self.api_key = _api_key(settings)

    def app_args(self) -> dict[str, Any] | None:
        """The ``app_args`` this application was built from (called through a handle, not over HTTP)."""
        return self.built_from

    def _error(self, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message, **exc.detail}, status_code=exc.status, headers=exc.headers)

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    def _model(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r}", known=sorted(self.models))
        return self.models[name]

    @app.get("/healthz")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title="ptm_ray - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title="ptm_ray - ReDoc",
                              redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png", with_google_fonts=False)

    @app.get("/readyz", responses=_documented(401, 503))
    async def ready(self, request: Request):
        """200 once every deployed model version answers; 503 naming those that do not (yet). Needs the key."""
        import asyncio

        try:
            self._check_key(request)
        except ApiError as e:
            return self._error(e)

        async def answers(handle: Any) -> str | None:
            try:
                return await asyncio.wait_for(handle.ready.remote(), 5.0)
            except Exception:  # starting, dead, or too slow to answer: not ready, whatever the reason
                return None

        keys = sorted(self.handles)
        answered = await asyncio.gather(*(answers(self.handles[key]) for key in keys))
        waiting = [key for key, device in zip(keys, answered) if not device]
        if waiting:
            return self._error(ApiError(503, f"not ready: {', '.join(waiting)} did not answer", waiting=waiting,
                                        headers={"Retry-After": "5"}))
        # local ones: loaded in this replica before any request
        devices = dict(zip(keys, answered)) | {key: str(p.artifact.device) for key, p in self.local.items()}
        return {"status": "ready", "models": sorted(devices), "devices": dict(sorted(devices.items()))}

    @app.get("/v1/models", responses=_documented(401))
    def list_models(self, request: Request):
        try:
            self._check_key(request)
        except ApiError as e:
            return self._error(e)
        return {"models": [self._describe(name, brief=True) for name in sorted(self.models)]}

    @app.get("/v1/models/{name}", responses=_documented(401, 404))
    def get_model(self, name: str, request: Request):
        try:
            self._check_key(request)
            self._model(name)
        except ApiError as e:
            return self._error(e)
        return self._describe(name, brief=False)

    def _describe(self, name: str, brief: bool) -> dict[str, Any]:
        versions = []
        for version, entry in sorted(self.models[name]["versions"].items()):
            meta = entry["meta"]
            item = {"version": version, "weight": entry["weight"], "task": meta["task"], "labels": meta["labels"],
                    "family": meta["family"], "modality": meta["modality"]}
            if not brief:
                item |= {"metrics": meta["metrics"], "lineage": meta["lineage"], "base_model": meta["model_name"]}
            versions.append(item)
        return {"name": name, "versions": versions}

    @app.post("/v1/models/{name}/predict", openapi_extra=_PREDICT_BODY,
              responses=_documented(400, 401, 404, 413, 415, 422, 503))
    async def predict(self, name: str, request: Request):
        return await self._predict(name, None, request)

    @app.post("/v1/models/{name}/versions/{version}/predict", openapi_extra=_PREDICT_BODY,
              responses=_documented(400, 401, 404, 413, 415, 422, 503))
    async def predict_version(self, name: str, version: str, request: Request):
        return await self._predict(name, version, request)

    async def _predict(self, name: str, version: str | None, request: Request):
        try:
            self._check_key(request)
            entry = self._model(name)
            chosen = self._choose_version(name, entry, version)
            meta = entry["versions"][chosen]["meta"]
            inputs, fields, parameters = await self._read_inputs(request, meta["modality"])
            options = self._task_options(task_for(meta["task"]), fields, parameters)
            inputs, notes = self._cap_texts(inputs) if meta["modality"] == "text" else (inputs, {})
            predictions = await self._call_model(f"{name}:{chosen}", inputs, options)
        except ApiError as e:
            return self._error(e)
        for i, note in notes.items():
            predictions[i] |= note
        return {"model": name, "version": chosen, "predictions": predictions}

    async def _call_model(self, key: str, inputs: list[Any], options: dict[str, Any]) -> list[dict[str, Any]]:
        """The predictions of version ``key``, within ``serve.request_timeout_s`` and its queue bound: from this
        replica when it holds the version, else from the version's deployment (a variant's: routed by its id)."""
        import asyncio

        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

        busy = {"Retry-After": "1"}
        timeout = self.settings["request_timeout_s"]
        died = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
        try:
            if key in self.local:
                return await asyncio.wait_for(self.local[key].predict(inputs, options), timeout)
            handle = self.handles[key]
            if key in self.variant_ids:
                handle = handle.options(multiplexed_model_id=self.variant_ids[key])
            try:
                return await asyncio.wait_for(handle.predict.remote(inputs, options), timeout)
            except died:  # its replica died mid-request: predictions are idempotent, so ask another once
                return await asyncio.wait_for(handle.predict.remote(inputs, options), timeout)
        except BackPressureError:
            raise ApiError(503, "the model is busy: its request queue is full (serve.max_queued_requests); "
                                "retry shortly", headers=busy) from None
        except asyncio.TimeoutError:
            raise ApiError(503, f"the prediction took longer than {self.settings['request_timeout_s']:g} s "
                                "(serve.request_timeout_s); retry shortly or send fewer inputs", headers=busy) from None

    def _cap_texts(self, texts: list[str]) -> tuple[list[str], dict[int, dict[str, Any]]]:
        """Texts cut to ``serve.max_text_chars`` before any tokenizer sees them, and a note per cut input."""
        capped, notes = [], {}
        for i, text in enumerate(texts):
            text, note = cap_text(text, self.settings["max_text_chars"])
            capped.append(text)
            if note:
                notes[i] = note
        return capped, notes

    def _task_options(self, task: Task, fields: dict[str, Any], parameters: dict[str, Any] | None) -> dict[str, Any]:
        """The request's options, checked by the task: ``parameters`` plus the top-level fields it takes."""
        for field in fields:
            if field not in task.request_fields:
                raise ApiError(422, f"{field} is not a top-level option of {task.name} models: send their options "
                                    "in 'parameters'")
        try:
            return task.request_options(fields | (parameters or {}), self.settings)
        except ValueError as e:
            raise ApiError(422, f"invalid parameters: {e}") from None

    def _choose_version(self, name: str, entry: dict[str, Any], version: str | None) -> int:
        versions = entry["versions"]
        if version is not None:
            number = version.lstrip("v")
            if not number.isdigit() or int(number) not in versions:
                raise ApiError(404, f"model {name!r} has no deployed version {version!r}", deployed=sorted(versions))
            return int(number)
        numbers = sorted(versions)
        return random.choices(numbers, weights=[versions[v]["weight"] for v in numbers])[0]  # canary split

    async def _read_inputs(self, request: Request, modality: str) -> tuple[list[Any], dict[str, Any], dict | None]:
        """(inputs, top-level option fields that were sent, ``parameters``) of a JSON or multipart request."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings["max_body_bytes"]:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {self.settings['max_body_bytes']}")
        try:
            body = await read_limited(request.stream(), self.settings["max_body_bytes"])
        except TooLarge as e:
            raise ApiError(413, str(e)) from None
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            inputs, fields, parameters = await self._read_multipart(_replay(request, body), modality)
        else:
            try:
                parsed = PredictRequest.model_validate_json(body)
            except ValidationError as e:
                errors = [{"field": ".".join(str(p) for p in err["loc"]) or "body", "problem": err["msg"]}
                          for err in e.errors(include_url=False, include_input=False)]
                status = 400 if any(err["type"] == "json_invalid" for err in e.errors()) else 422
                raise ApiError(status, "invalid request body: " + "; ".join(f"{x['field']}: {x['problem']}" for x in errors),
                               errors=errors) from None
            inputs, parameters = list(parsed.inputs), parsed.parameters
            fields = {"top_k": parsed.top_k} if parsed.top_k is not None else {}
            if modality != "text":
                inputs = [self._decode_base64(i, item) for i, item in enumerate(inputs)]
        if len(inputs) > self.settings["max_items"]:
            raise ApiError(413, f"{len(inputs)} inputs exceed the limit of {self.settings['max_items']} per request")
        if modality != "text":
            for i, data in enumerate(inputs):
                self._check_input(i, data, modality)
        return inputs, fields, parameters

    async def _read_multipart(self, request: Request, modality: str) -> tuple[list[bytes], dict[str, Any], dict | None]:
        if modality == "text":
            raise ApiError(415, "this is a text model: send JSON {\"inputs\": [\"...\"]}")
        from fastapi.exceptions import StarletteHTTPException  # what Starlette's form parser raises

        try:  # Starlette stops parsing at these counts (2,000 tiny parts would otherwise each be a file object)
            form = await request.form(max_files=self.settings["max_items"], max_fields=16)
        except StarletteHTTPException as e:
            raise ApiError(413 if "Too many" in str(e.detail) else 400, f"multipart body: {e.detail}") from None
        files = [await f.read() for key, f in form.multi_items() if key == "files" and hasattr(f, "read")]
        if not files:
            raise ApiError(422, "multipart upload needs one or more parts named 'files'")
        top_k = form.get("top_k")
        if top_k is not None and not str(top_k).isdigit():
            raise ApiError(422, f"top_k must be a positive integer, got {top_k!r}")
        parameters = form.get("parameters")  # task options as a JSON object, e.g. {"score_threshold": 0.5}
        if parameters is not None:
            import json

            try:
                parameters = json.loads(str(parameters))
            except json.JSONDecodeError:
                raise ApiError(422, "the 'parameters' form field must be a JSON object") from None
            if not isinstance(parameters, dict):
                raise ApiError(422, "the 'parameters' form field must be a JSON object")
        return files, {"top_k": int(top_k)} if top_k else {}, parameters

    @staticmethod
    def _decode_base64(index: int, item: str) -> bytes:
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, f"inputs[{index}] is not valid base64 (send the file's bytes base64-encoded)") from None

    def _check_input(self, index: int, data: bytes, modality: str) -> None:
        """Header limits first (pixels, duration, sample rate), then a decode of what passed them."""
        from ptm_ray.models.vision import decode_image

        try:
            if modality == "image":
                probe_image(data, self.settings["max_image_pixels"])
                decode_image(data)
            else:
                probe_audio(data, self.settings["max_audio_seconds"])
        except TooLarge as e:
            raise ApiError(413, f"inputs[{index}]: {e}") from None
        except (InputError, ValueError) as e:
            raise ApiError(422, f"inputs[{index}]: {e}") from None


def app_args(cfg: Config) -> dict[str, Any]:
    """The arguments of ``build_app``: registry paths of each deployed version, weights and settings."""
    from dataclasses import asdict

    sv = cfg.serve
    if not sv.models:
        raise ValueError("serve.models is empty: list the registry models to deploy, e.g. "
                         "serve.models=[{name: support-intents}]")
    registry = ModelStore(sv.registry)
    models = []
    for i, spec in enumerate(sv.models):
        if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "versions"}:
            raise ValueError(f"serve.models[{i}] must be {{name: ..., versions: [{{version: N, weight: W}}]}}, got {spec!r}")
        versions = []
        for j, v in enumerate(spec.get("versions") or [{"version": "latest", "weight": 100}]):
            if not isinstance(v, dict) or set(v) - {"version", "weight"} or v.get("weight", 100) < 0:
                raise ValueError(f"serve.models[{i}].versions[{j}] must be {{version: N, weight: W >= 0}}, got {v!r}")
            found = registry.get(spec["name"], v.get("version", "latest"))
            # a damaged version is refused here, before anything deployed changes (on object storage by its files'
            # sizes: each replica checks the hashes of the copy it loads)
            registry.verify(found, hashes="://" not in registry.root)
            versions.append({"version": found.version, "weight": float(v.get("weight", 100)), "path": found.path})
        if sum(v["weight"] for v in versions) <= 0:
            raise ValueError(f"serve.models[{i}]: the version weights add up to 0")
        models.append({"name": spec["name"], "versions": versions})
    return {"models": models, "settings": asdict(sv)}


def _meta(path: str) -> dict[str, Any]:
    """What the ingress tells clients about a version, read from its registry folder (local or URI)."""
    import json

    from ptm_ray.data import read_bytes
    from ptm_ray.models import family_for

    meta = json.loads(read_bytes(f"{path}/ptm_ray.json"))
    try:
        lineage = json.loads(read_bytes(f"{path}/lineage.json"))
        lineage.pop("files", None)  # the manifest of file hashes is for the registry's checks, not for clients
    except (OSError, FileNotFoundError):
        lineage = {}
    return {"task": meta["task"], "labels": meta["labels"], "family": meta["family"], "metrics": meta["metrics"],
            "modality": family_for(meta["family"]).modality, "lineage": lineage, "model_name": meta["model_name"]}


# ``serve.run`` restarts every replica of an application (each run is a new code version). Serve's default
# stops a replica before starting its replacement, so a deployment with one replica had none for a moment
# and requests routed to it failed (HTTP 500 in the roll-out test). With 100 % surge the replacements
# start first and the old replicas drain after.
_SURGE = 100


def _placements(args: dict[str, Any]) -> dict[str, str]:
    """Where each version ("name:version") runs: ``shared`` (a variant, on the ``VariantServer`` of its base,
    when two or more variants of that base are deployed), ``local`` (inside the ingress replica: the only
    version taking traffic, ``serve.one_hop`` on) or ``own`` (a ``ModelServer`` deployment ``<name>-v<version>``)."""
    from ptm_ray.variants import base_key, read_variant_info

    settings = args["settings"]
    versions = [(model["name"], v) for model in args["models"] for v in model["versions"]]
    bases = {}
    if settings["max_variants_per_replica"] > 0:
        for name, v in versions:
            info = read_variant_info(v["path"])
            if info is not None:
                bases[f"{name}:{v['version']}"] = base_key(_meta(v["path"]), info)
    sharing = [key for key, base in bases.items() if list(bases.values()).count(base) > 1]
    taking_traffic = [(name, v) for name, v in versions if v["weight"] > 0]
    places = {}
    for name, v in versions:
        key = f"{name}:{v['version']}"
        if key in sharing:
            places[key] = "shared"
        elif settings["one_hop"] and taking_traffic == [(name, v)]:
            places[key] = "local"
        else:
            places[key] = "own"
    return places


@functools.cache
def _source_digest() -> str:
    """A digest of ptm_ray's own source: a replica started by other code is never taken for an unchanged one."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _pinned(deployment: Any, path: str, *init_args: Any) -> Any:
    """``deployment`` with a code version that changes only when what its replicas load would change.

    Serve gives every deployment of a ``serve.run`` a new random code version unless one is set, so each deploy
    restarted every model's replicas, even those of models whose version, weights and settings were unchanged
    (a roll-out of one model reloaded all of them). The version pinned here is a digest of ptm_ray's source, the
    registry version's file manifest (``lineage.json``, which commits it) and the replica's arguments; Serve still
    restarts replicas whose resources or deployment settings change. Without a manifest (a folder that is not a
    registry version) or where this Ray has no such option, the deployment keeps Serve's default.
    """
    import json

    from ptm_ray.data import read_bytes

    try:
        files = json.loads(read_bytes(f"{path}/lineage.json"))["files"]
    except (OSError, KeyError, ValueError):
        return deployment
    payload = json.dumps([_source_digest(), path, files, init_args], sort_keys=True, default=str)
    try:  # Serve's own internal option: ``version`` is refused from user code
        return deployment.options(version=hashlib.sha256(payload.encode()).hexdigest()[:20], _internal=True)
    except (TypeError, ValueError):
        return deployment


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``app_args`` (also the ``import_path`` target of ``serve deploy``).

    Each version runs where ``_placements`` puts it. ``args["draining"]`` (a roll-out's first step, see
    ``deploy``) lists versions whose deployments the new ingress never calls but keeps while the old ingress
    replicas finish their requests on them.
    """
    from ptm_ray.variants import base_key, read_variant_info

    settings = args["settings"]
    autoscaling = {k: settings[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                            "upscale_delay_s", "downscale_delay_s")}
    autoscaling["look_back_period_s"] = settings.get("look_back_period_s", 30.0)  # absent from older Serve configs
    # a replica takes enough requests at once for a full forward pass (Serve's default, 5, capped batches at 5)
    model_options = {"autoscaling_config": autoscaling, "max_surge_percent": _SURGE,
                     "ray_actor_options": {"num_cpus": settings["num_cpus"], "num_gpus": settings["num_gpus"]},
                     "max_ongoing_requests": max(32, 2 * settings["max_batch_size"]),
                     "max_queued_requests": settings["max_queued_requests"]}

    def own(name: str, v: dict[str, Any]) -> Any:
        deployment = ModelServer.options(name=f"{name}-v{v['version']}", **model_options)
        return _pinned(deployment, v["path"], settings["max_batch_size"]).bind(v["path"], settings["max_batch_size"])

    places = _placements(args)
    models, handles, variant_ids, shared, local = {}, {}, {}, {}, {}
    for model in args["models"]:
        for v in model["versions"]:
            key, meta = f"{model['name']}:{v['version']}", _meta(v["path"])
            models.setdefault(model["name"], {"versions": {}})["versions"][v["version"]] = {"weight": v["weight"],
                                                                                          "meta": meta}
            if places[key] == "shared":
                group = base_key(meta, read_variant_info(v["path"]))
                if group not in shared:
                    digest = hashlib.sha256(group.encode()).hexdigest()[:10]
                    init_args = (v["path"], settings["max_batch_size"], settings["max_variants_per_replica"])
                    deployment = VariantServer.options(name=f"shared-{digest}", **model_options)
                    shared[group] = _pinned(deployment, *init_args).bind(*init_args)
                handles[key], variant_ids[key] = shared[group], v["path"]
            elif places[key] == "local":
                local[key] = v["path"]
            else:
                handles[key] = own(model["name"], v)
    draining = {f"{d['name']}:{d['version']}": own(d["name"], d) for d in args.get("draining", [])}
    if local:  # the ingress is the model's deployment: its resources, autoscaling and request bounds
        ingress = Ingress.options(**model_options)
    else:  # the ingress only forwards: many requests at once, each waiting on a model deployment
        ingress = Ingress.options(ray_actor_options={"num_cpus": 0.1}, max_surge_percent=_SURGE,
                                  num_replicas=settings["ingress_replicas"], max_ongoing_requests=256,
                                  max_queued_requests=settings["max_queued_requests"])
    built_from = {k: v for k, v in args.items() if k != "draining"}
    return ingress.bind(models, handles, settings, variant_ids, local, draining, built_from)


def write_serve_config(args: dict[str, Any], sv: ServeConfig) -> Path:
    """The declarative Serve config (``serve deploy <file>``) for the same application."""
    out = Path(sv.config_out).expanduser().resolve()
    document = {
        "proxy_location": sv.proxy_location,
        "http_options": {"host": sv.host, "port": sv.port},
        "applications": [{"name": sv.app_name, "route_prefix": sv.route_prefix,
                          "import_path": "ptm_ray.serve:build_app", "args": args}],
    }
    out.write_text(yaml.safe_dump(document, sort_keys=False))
    return out


def _deployed_versions(app_name: str) -> dict[str, set[int]]:
    """Model versions the running application serves now (from its deployment names ``<model>-v<N>``)."""
    import re

    status = serve.status().applications.get(app_name)
    found: dict[str, set[int]] = {}
    for deployment in (status.deployments if status else {}):
        match = re.fullmatch(r"(.+)-v(\d+)", deployment)
        if match:
            found.setdefault(match.group(1), set()).add(int(match.group(2)))
    return found


def _running_app_args(app_name: str) -> dict[str, Any] | None:
    """The ``app_args`` the running application was built from, or None (no such application, or one deployed
    by an older ptm_ray whose ingress cannot say)."""
    if app_name not in serve.status().applications:
        return None
    try:
        return serve.get_app_handle(app_name).app_args.remote().result(timeout_s=60)
    except Exception:  # noqa: BLE001 - a missing or unreachable ingress: nothing to restore
        return None


def _startup_failure(app_name: str) -> str | None:
    """Why the application's deployments failed to start: per failed deployment, the last error line Serve kept
    from its replicas' constructor (e.g. the ``ValueError`` of a registry version whose files are damaged)."""
    import re

    status = serve.status().applications.get(app_name)
    reasons = []
    failed = [(name, d) for name, d in (status.deployments.items() if status else [])
              if str(d.status).endswith("DEPLOY_FAILED")]
    if any(name != "Ingress" for name, _ in failed):  # the ingress failed because a version did: name the version
        failed = [(name, d) for name, d in failed if name != "Ingress"]
    for name, deployment in failed:
        errors = [line for line in (deployment.message or "").splitlines()
                  if re.match(r"[\w.]+(Error|Exception): ", line) and not line.endswith("(most recent call last):")]
        reasons.append(f"deployment {name}: {errors[-1] if errors else (deployment.message or 'failed').splitlines()[0]}")
    return "; ".join(reasons) or None


def _roll_back(sv: ServeConfig, previous: dict[str, Any] | None, reason: str) -> None:
    """Restore the application a failed deploy replaced (Serve keeps old replicas only where the new ones failed: a
    new ingress would route to versions that never started), then raise naming why the deploy failed."""
    if previous is None:
        raise ValueError(f"serve.models: the application did not start: {reason}") from None
    serve.run(build_app(previous), name=sv.app_name, route_prefix=sv.route_prefix)
    served = ", ".join(f"{m['name']}:{v['version']}" for m in previous["models"] for v in m["versions"])
    raise ValueError(f"serve.models: the new application did not start: {reason}. The application serves what it "
                     f"served before the deploy ({served}).") from None


def _wait_until_settled(app_name: str, timeout_s: float = 120.0) -> None:
    """Wait until no replica of the application is starting or stopping (old ones drained)."""
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = serve.status().applications.get(app_name)
        states = [s for d in (status.deployments.values() if status else []) for s in (d.replica_states or {})]
        if all(s == "RUNNING" for s in states):
            return
        time.sleep(0.5)


def _refuse_another_bind(sv: ServeConfig) -> None:
    """A running Serve keeps its proxy's host and port whatever a later ``serve.start`` asks: refuse to pretend."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    running = client.http_config
    if (running.host, running.port) != (sv.host, sv.port):
        raise ValueError(f"Serve is already running with its HTTP proxy on {running.host}:{running.port}, but "
                         f"serve.host/serve.port ask for {sv.host}:{sv.port}; a running proxy keeps its bind, so "
                         f"this deploy would not be where the config says. Run `serve shutdown` first, or deploy "
                         f"with serve.host={running.host} serve.port={running.port}")


def deploy(cfg: Config) -> tuple[str, Path]:
    """Deploy ``cfg.serve.models`` on Serve (starting Serve on ``serve.host:port`` if needed).

    Updating a running application is a two-step roll-out, so no request fails: first the new application
    starts with the deployments it no longer needs kept beside it (the new ingress never calls them; Serve starts
    the new ingress replicas before stopping the old ones), and once the old ingress replicas have drained, those
    deployments are removed.

    Returns the base URL of the API and the path of the written Serve config YAML.
    """
    from ptm_ray.runtime import init_ray

    args = app_args(cfg)  # registry lookups and validation before any Ray work
    init_ray()
    sv = cfg.serve
    _refuse_another_bind(sv)
    serve.start(proxy_location=sv.proxy_location, http_options={"host": sv.host, "port": sv.port})
    registry = ModelStore(sv.registry)
    kept = {f"{key.replace(':', '-v')}" for key, place in _placements(args).items() if place == "own"}
    draining = [{"name": name, "version": version, "path": registry.get(name, version).path}
                for name, versions in _deployed_versions(sv.app_name).items() for version in sorted(versions)
                if f"{name}-v{version}" not in kept]
    previous = _running_app_args(sv.app_name)
    try:
        if draining:  # first the new ingress beside the old deployments, then (old ingress drained) without them
            serve.run(build_app(dict(args, draining=draining)), name=sv.app_name, route_prefix=sv.route_prefix)
            _wait_until_settled(sv.app_name)
        serve.run(build_app(args), name=sv.app_name, route_prefix=sv.route_prefix)
    except RuntimeError as e:  # Serve: "Deploying application ... failed" (replicas that could not start)
        _roll_back(sv, previous, _startup_failure(sv.app_name) or str(e).splitlines()[0])
    config_path = write_serve_config(args, sv)
    prefix = sv.route_prefix.rstrip("/")
    return f"http://{sv.host}:{sv.port}{prefix}", config_path
