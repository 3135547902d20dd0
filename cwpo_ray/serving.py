"""The annotator over HTTP: a Ray Serve application with a FastAPI ingress and dynamic batching.

Endpoints (all JSON):
  POST /v1/annotate   one pair ``{prompt, response_a, response_b, id?}``, a list of pairs, or
                      ``{"pairs": [...]}`` (at most ``max_pairs``); answers
                      ``{"results": [{id, preferred, confidence, confidence_raw, reward_a, reward_b, truncated}, ...]}``
  GET  /v1/health     liveness; always open, even with a token (probes carry no secrets; it says nothing)
  GET  /v1/info       annotator.json metadata, the serving limits and this replica's batch counters
  GET  /openapi.json  the OpenAPI schema

Each pair of a request is queued on its own for ``@serve.batch``, so pairs from many
concurrent requests share one forward pass; scores come from ``Annotator.label_pairs``,
the function `cwpo annotate` uses (any folder ``load_annotator`` reads: an annotator, or a
one-label transformers reward model). Bad input always gets a 4xx with a body
``{"error": ..., "field": ...}`` naming the offending field (``pairs[0].prompt``, ``body``).

When ``CWPO_API_TOKEN`` is set (in the replica's environment, or in the environment of the
process that builds the app), every route except /v1/health needs ``Authorization: Bearer <token>``.

Deploy with `cwpo serve`, `serve run cwpo_ray.serving:build_app annotator=DIR`, or
`serve deploy cluster/serve_annotator.yaml` (also the ``serveConfigV2`` of a KubeRay RayService).
"""

# No `from __future__ import annotations`: FastAPI must see real types in the route signatures.
import asyncio
import hmac
import json
import os
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Optional

import cwpo_ray.ray_env  # noqa: F401  (before ray: Ray reads its loopback switch at import time)
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cwpo_ray.config import build as build_config, option

TOKEN_ENV = "CWPO_API_TOKEN"
API_VERSION = "1"


# ----------------------------------------------------------------------------- settings

@dataclass
class ServeSettings:
    """How the app is deployed. Field names are the keys of ``build_app`` args and the CLI flags."""

    annotator: str = option(help="annotator folder written by train-annotator, or a one-label HF reward-model "
                                 "folder (docs/ANNOTATOR_FORMAT.md)", must_exist=True)
    max_batch_size: int = option(32, "most pairs scored in one forward pass (dynamic batching)")
    batch_wait_timeout_s: float = option(0.01, "longest a pair waits for others to fill its batch")
    max_pairs: int = option(256, "most pairs in one request")
    max_body_bytes: int = option(4 * 1024 * 1024, "largest request body in bytes (larger: 413)")
    replicas: int = option(1, "replicas (the minimum when autoscaling)")
    max_replicas: int = option(0, "autoscale up to this many replicas (0: a fixed number of replicas)")
    num_cpus: float = option(0.5, "CPUs reserved per replica (fractional is fine)")
    num_gpus: float = option(0.0, "GPUs per replica (the model moves to cuda when > 0)")
    max_ongoing_requests: int = option(0, "concurrent requests per replica (0: 2 x max_batch_size); "
                                          "a batch of one-pair requests never exceeds it")
    max_queued_requests: int = option(1024, "requests waiting for a replica before new ones get 503 (-1: no limit)")
    torch_threads: int = option(0, "torch intra-op threads per replica (0: as Ray sets them from num_cpus)")

    def validate(self) -> None:
        checks = [
            (self.max_batch_size >= 1, "max_batch_size must be >= 1"),
            (self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s must be >= 0"),
            (self.max_pairs >= 1, "max_pairs must be >= 1"),
            (self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"),
            (self.replicas >= 1, "replicas must be >= 1"),
            (self.max_replicas == 0 or self.max_replicas >= self.replicas,
             "max_replicas must be 0 (no autoscaling) or >= replicas"),
            (self.num_cpus > 0, "num_cpus must be > 0"),
            (self.num_gpus >= 0, "num_gpus must be >= 0"),
            # Serve hands a replica at most max_ongoing_requests requests at once, so a lower
            # value silently caps every batch of one-pair requests (default max_ongoing_requests is 5).
            (self.max_ongoing_requests == 0 or self.max_ongoing_requests >= self.max_batch_size,
             "max_ongoing_requests must be 0 (auto) or >= max_batch_size, else batches never fill"),
            (self.max_queued_requests == -1 or self.max_queued_requests >= 1, "max_queued_requests must be -1 or >= 1"),
            (self.torch_threads >= 0, "torch_threads must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def ongoing_limit(self) -> int:
        # Twice the batch: one batch computes while the next one fills.
        return self.max_ongoing_requests or 2 * self.max_batch_size


def settings_from_args(args: dict[str, Any]) -> ServeSettings:
    """Typed settings from ``serve run``/``serve deploy`` args (strings or YAML values); ConfigError names the key."""
    return build_config(ServeSettings, dict(args or {}))


# ----------------------------------------------------------------------------- API schema

def _check_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("invalid unicode (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_check_text)]


class PairIn(BaseModel):
    """One unlabeled pair. Types are strict: a number is not a string; unknown keys are refused (typos)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: Text
    response_a: Text
    response_b: Text
    id: Optional[str] = Field(None, min_length=1, max_length=256,
                              description="echoed back; when absent, the content id `cwpo data` would give")


class AnnotateBatch(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    pairs: list[PairIn]


class PairResult(BaseModel):
    id: str
    preferred: str = Field(description='"a" or "b" (a tie goes to "a")')
    confidence: float = Field(description="2 * (sigmoid(|reward_a - reward_b| / T) - 0.5), in [0, 1): calibrated "
                                          "with the annotator's temperature T (1 for an uncalibrated annotator)")
    confidence_raw: float = Field(description="the same with T = 1 (the paper's confidence)")
    reward_a: float
    reward_b: float
    truncated: bool = Field(description="a text was cut to the annotator's max_length")


class AnnotateResponse(BaseModel):
    results: list[PairResult]


class ErrorBody(BaseModel):
    error: str
    field: Optional[str] = Field(None, description='the offending field, e.g. "pairs[0].prompt", "body", "Authorization"')
    errors: Optional[list[dict]] = Field(None, description="every validation error (at most 20), each {field, error}")


class ApiError(Exception):
    """A client mistake: answered with ``status`` and a body ``{"error", "field", ...}``."""

    def __init__(self, status: int, error: str, field: Optional[str] = None, headers: Optional[dict] = None,
                 content: Optional[dict] = None):
        super().__init__(error)
        self.status, self.headers = status, headers
        self.content = content or {"error": error, "field": field}


def field_path(loc: tuple | list) -> str:
    """pydantic's ``("pairs", 0, "prompt")`` -> ``"pairs[0].prompt"``; FastAPI's "body" prefix dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header") and len(parts) > 1:
        parts = parts[1:]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def validation_error_body(errors: list[dict]) -> dict:
    """The first error names the field; all of them are listed (capped) for clients fixing many rows."""
    listed = [{"field": field_path(e["loc"]), "error": e["msg"].removeprefix("Value error, ")}
              for e in errors[:20]]
    return {"error": listed[0]["error"], "field": listed[0]["field"], "errors": listed}


def parse_pairs(body: bytes, max_pairs: int) -> list[PairIn]:
    """Raw body -> pairs, or ApiError naming the field. Accepts a pair, a list, or {"pairs": [...]}."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"invalid JSON: {str(e).splitlines()[0][:200]}", "body") from None
    if isinstance(data, dict) and "pairs" in data:
        raw, model = data, AnnotateBatch
    elif isinstance(data, list):
        raw, model = {"pairs": data}, AnnotateBatch
    elif isinstance(data, dict):
        raw, model = data, PairIn
    else:
        raise ApiError(422, "expected a pair object, a list of pairs, or {\"pairs\": [...]}", "body")
    if model is AnnotateBatch and isinstance(raw.get("pairs"), list):
        count = len(raw["pairs"])
        if count == 0:
            raise ApiError(422, "no pairs given", "pairs")
        if count > max_pairs:
            raise ApiError(422, f"at most {max_pairs} pairs per request, got {count}", "pairs")
    try:
        parsed = model.model_validate(raw)
    except ValidationError as e:
        body = validation_error_body(e.errors())
        raise ApiError(422, body["error"], body["field"], content=body) from None
    return parsed.pairs if isinstance(parsed, AnnotateBatch) else [parsed]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", "body")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked uploads declare no length
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "body")
            chunks.append(chunk)
    except (ClientDisconnect, TaskCancelledError):
        # The client hung up mid-body (starlette sees the disconnect, or Serve's proxy has cancelled the
        # request while the body was being received): no one will read an answer; 499 (nginx's "client
        # closed request") so that Serve's logs and error counts do not book it as a server error (500).
        raise ApiError(499, "the client closed the request before its body was sent", "body") from None
    return b"".join(chunks)


def check_token(expected: Optional[str], header: Optional[str]) -> None:
    """401 unless ``header`` is ``Bearer <expected>``; nothing to check when no token is configured."""
    if not expected:
        return
    scheme, _, given = (header or "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())
    if not ok:
        raise ApiError(401, "missing or wrong bearer token", "Authorization",
                       headers={"WWW-Authenticate": 'Bearer realm="cwpo"'})


# ----------------------------------------------------------------------------- FastAPI app

api = FastAPI(title="cwpo annotator", version=API_VERSION, openapi_url=None, docs_url=None, redoc_url=None,
              description="Scores preference pairs with a trained CWPO annotator (Bradley-Terry reward + confidence).")


def _error(status: int, content: dict, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=content, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.content, exc.headers)


@api.exception_handler(RequestValidationError)
async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, validation_error_body(list(exc.errors())))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # 404 / 405 in the same shape as every other error.
    return _error(exc.status_code, {"error": str(exc.detail), "field": None}, getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # No traceback to the client; Serve's replica log has it.
    return _error(500, {"error": "internal error", "field": None})


def _request_body_schema() -> dict:
    refs = {name: {"$ref": f"#/components/schemas/{name}"} for name in ("PairIn", "AnnotateBatch")}
    return {"required": True, "content": {"application/json": {"schema": {"oneOf": [
        refs["PairIn"], {"type": "array", "items": refs["PairIn"]}, refs["AnnotateBatch"]]}}}}


def openapi_schema() -> dict:
    """FastAPI's schema plus the request models, which are parsed by hand (for the size limit)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        _, defs = models_json_schema([(PairIn, "validation"), (AnnotateBatch, "validation")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        api.openapi_schema = schema
    return api.openapi_schema


def _result(pair: PairIn, label: dict) -> PairResult:
    from cwpo_ray.sources import pair_id  # the stable content id `cwpo data` gives

    return PairResult(id=pair.id or pair_id(pair.prompt, pair.response_a, pair.response_b), **label)


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 413, 422)}


# ----------------------------------------------------------------------------- deployment
# Everything the routes call must be defined above this line: @serve.ingress freezes (pickles)
# the FastAPI app, and with it the routes' globals, when the class is decorated.

@serve.deployment(name="Annotator")
@serve.ingress(api)
class AnnotatorServer:
    """One replica: the annotator in memory, batching pairs across concurrent requests."""

    def __init__(self, settings: ServeSettings, api_token: Optional[str] = None):
        import torch

        from cwpo_ray.annotator import load_annotator
        from cwpo_ray.ray_env import keep_serve_replica_grpc_on_loopback

        keep_serve_replica_grpc_on_loopback()  # before Serve starts the replica's gRPC server (after this)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        # The replica's own environment wins; the build-time value covers `cwpo serve` joining a cluster.
        self.token = os.environ.get(TOKEN_ENV) or api_token or None
        device = "cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.annotator = load_annotator(settings.annotator, device=device)
        self.stats = {"requests": 0, "pairs": 0, "batches": 0, "largest_batch": 0, "most_requests_in_batch": 0}
        self._label_batch.set_max_batch_size(settings.max_batch_size)
        self._label_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _label_batch(self, items: list[tuple[int, PairIn]]) -> list[dict]:
        pairs = [p for _, p in items]
        # Inline on purpose: Serve already runs user code on its own event-loop thread, so health checks
        # and queue-length probes still get answered. Pushing this into asyncio.to_thread made the loop
        # fight the compute thread for the GIL: requests then trickled in and batches stayed small
        # (bench/RESULTS.md, serve latency and batching).
        out = self.annotator.label_pairs([p.prompt for p in pairs], [p.response_a for p in pairs],
                                         [p.response_b for p in pairs])
        self._count_batch(items)
        return [{key: out[key][i] for key in out} for i in range(len(pairs))]

    def _count_batch(self, items: list[tuple[int, PairIn]]) -> None:
        s = self.stats
        s["batches"] += 1
        s["pairs"] += len(items)
        s["largest_batch"] = max(s["largest_batch"], len(items))
        s["most_requests_in_batch"] = max(s["most_requests_in_batch"], len({tag for tag, _ in items}))

    @api.post("/v1/annotate", response_model=AnnotateResponse, responses=ERRORS,
              openapi_extra={"requestBody": _request_body_schema()})
    async def annotate(self, request: Request) -> AnnotateResponse:
        """Label pairs: which response the annotator prefers, both rewards, and the confidence."""
        check_token(self.token, request.headers.get("authorization"))
        pairs = parse_pairs(await read_body(request, self.settings.max_body_bytes), self.settings.max_pairs)
        self.stats["requests"] += 1
        tag = self.stats["requests"]
        labels = await asyncio.gather(*(self._label_batch((tag, p)) for p in pairs))
        return AnnotateResponse(results=[_result(p, label) for p, label in zip(pairs, labels)])

    @api.get("/v1/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info", responses={401: {"model": ErrorBody}})
    async def info(self, request: Request) -> dict:
        """Annotator metadata (annotator.json), the serving limits, and this replica's counters."""
        import torch

        check_token(self.token, request.headers.get("authorization"))
        s = self.settings
        return {
            "annotator": asdict(self.annotator.meta),
            "limits": {"max_pairs": s.max_pairs, "max_body_bytes": s.max_body_bytes,
                       "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s},
            "auth": bool(self.token),
            "torch_threads": torch.get_num_threads(),
            "replica_stats": dict(self.stats),
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        check_token(self.token, request.headers.get("authorization"))
        return JSONResponse(jsonable_encoder(openapi_schema()))


def deployment_options(s: ServeSettings) -> dict:
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.ongoing_limit(),
        "max_queued_requests": s.max_queued_requests,
    }
    if s.max_replicas > s.replicas:
        # Scale on queue depth: one full batch in flight per replica is the target.
        opts["autoscaling_config"] = {"min_replicas": s.replicas, "max_replicas": s.max_replicas,
                                      "target_ongoing_requests": s.max_batch_size}
    else:
        opts["num_replicas"] = s.replicas
    return opts


def build_application(settings: ServeSettings):
    """The bound application for ``settings``."""
    return AnnotatorServer.options(**deployment_options(settings)).bind(settings, os.environ.get(TOKEN_ENV))


def build_app(args: dict) -> "serve.Application":
    """Application builder for `serve run cwpo_ray.serving:build_app annotator=DIR ...` and Serve config files."""
    return build_application(settings_from_args(args))
