"""The HTTP API: a FastAPI app wrapped in one ASGI guard.

The guard, outermost, does for every request what must never be forgotten by a route: the API key
(every route but /healthz, /docs and /openapi.json; `Authorization: Bearer KEY`, compared in constant time),
the body size limit (Content-Length first, then the bytes actually received), the request count by route and
status, the latency histogram and the in-flight gauge. Routes answer errors as JSON `{"error": {"message",
"type", "limit"}}`; an unexpected exception becomes a 500 with one line and no input text in it, and its
traceback (frames only: an exception's message may quote the input) goes to the server log. Request log lines
(logger `workbench.serve`) hold route, status, latency and counts; input text only with `log_text=True`.

With `allowed_hosts` set (what `serve --no-api-key` does: the loopback names), the guard also refuses a
foreign Host (DNS rebinding) and requests sent by pages of other sites (connections.py). The micro-batcher
bounds its queue (503 with Retry-After) and each request's wait (504).

Bodies are Pydantic models (bodies.py), declared on the handlers: FastAPI validates each request against its
model (a refusal is the one-line error above, 422 or 413 naming the limit) and /docs shows them. Before
FastAPI reads a body, `CheckedRoute` parses it with `inputs.parse_json` (bounded nesting and integers, UTF-8),
and the models check every text before any tokenizer sees it (unpaired surrogates, NUL).

Routes: GET /healthz, /readyz, /metrics, /v1/models, /docs, /openapi.json; POST /v1/classify, /v1/translate,
/v1/ner (the text routes: `TEXT_ROUTES`), /v1/chat/completions (OpenAI-compatible, `stream: true` as
server-sent events; the answers of concurrent requests are generated together, sharing decode steps:
generation.py). A run answers on its task's route (its row's `route` in the task table); another task's
route is a 404 naming the right one.

(No `from __future__ import annotations` here: each app's request models are built from its limits, and the
handlers' annotations must name them when the handlers are defined, for FastAPI to read.)
"""

import asyncio
import json
import logging
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from ..errors import WorkbenchError
from ..privacy import mask_value
from .bodies import (ChatCompletion, ClassifyResponse, ErrorBody, ExplainResponse, Health, ModelList, NerResponse,
                     Ready, TranslateResponse, refusal, request_bodies)
from .adapter import ServedModel
from .batching import MicroBatcher, QueueFull, QueueTimeout
from .connections import cross_site_problem
from .inputs import InputError, parse_json
from .keys import keys_match
from .monitor import Baseline, ServerMetrics

if TYPE_CHECKING:  # torch is imported once a chat model is served
    from .generation import GenerationScheduler, Ticket

log = logging.getLogger("workbench.serve")
PASSING = "workbench.passing"  # scope key: a request let in by ServerState.busy, not yet counted by the batcher

CHAT_ROUTE = "/v1/chat/completions"
EXPLAIN_ROUTE = "/v1/explain"
OPEN_ROUTES = ("/healthz", "/docs", "/openapi.json")  # answered without the key: nothing in them is private


@dataclass
class ServeSettings:
    """Batching and the limits every request is held to (each a 4xx naming the limit when passed)."""

    max_batch_size: int = 32          # inputs per model call; 1 = batch-1 serving (no grouping)
    max_generation_batch: int = 16    # chat answers generated together (rows of a decode step); 1 = one at a time
    max_wait_ms: float = 5.0          # how long the first request of a group waits for others
    max_body_bytes: int = 1_000_000   # request body size (413)
    max_texts: int = 64               # texts in one classify/translate request (413)
    max_chars: int = 20_000           # characters in one text or one chat message (413)
    max_messages: int = 64            # messages in one chat request (413)
    max_tokens: int = 512             # the largest max_tokens a chat request may ask for (422)
    max_queue: int = 128              # texts waiting or running (a chat request counts 1); beyond: 503
    request_timeout_s: float = 60.0   # the longest a request waits for the model, queue included (504)
    max_queue_wait_s: float | None = 0.5  # refuse (503 + Retry-After) a request expected to wait longer for the
    #                                       model than this (a fit of recent calls); None: max_queue only
    header_timeout_s: float = 10.0    # a connection's request headers must be complete within this (closed)
    body_timeout_s: float = 10.0      # the longest pause between two chunks of a request body (408)
    max_connections: int = 512        # open connections and requests in progress; beyond: 503
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered, no cross-site calls; None: no check
    log_text: bool = False            # put input texts in request log lines, personal data masked (off: no text)
    abstain_below: float | None = None  # answer "uncertain" below this top-class probability; None: the run's

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_generation_batch", "max_body_bytes", "max_texts", "max_chars",
                     "max_messages", "max_tokens", "max_queue", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {getattr(self, name)!r}")
        if self.max_queue_wait_s is not None and not self.max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be a number of seconds > 0 (or None), got "
                             f"{self.max_queue_wait_s!r}")
        if self.abstain_below is not None and not 0.0 < self.abstain_below < 1.0:
            raise ValueError(f"abstain_below must be a probability between 0 and 1, got {self.abstain_below!r}")
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(self.allowed_hosts)
            if not self.allowed_hosts:
                raise ValueError("allowed_hosts is empty: name at least one host (or '*' for any)")


class ApiError(Exception):
    """An answer other than 2xx, as JSON: status, message (the problem and the fix), type, the limit's name."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", limit: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.limit, self.headers = status, message, kind, limit, headers

    def body(self) -> bytes:
        error: dict[str, Any] = {"message": self.message, "type": self.kind}
        if self.limit:
            error["limit"] = self.limit
        return json.dumps({"error": error}).encode()


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


def log_internal_error(where: str, exc: BaseException) -> None:
    """One line and the traceback's frames in the server log (not the message: it may quote the input)."""
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    log.error("internal error on %s: %s\n%s", where, type(exc).__name__, frames)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than max_body_bytes={limit}: send less per request "
                         "(or start the server with a larger --max-body-bytes)", "limit_exceeded", "max_body_bytes")


def _stalled(timeout_s: float) -> ApiError:
    return ApiError(408, f"the request body stalled for more than body_timeout_s={timeout_s:g} s: send the whole "
                         "body at once", "timeout", "body_timeout_s")


async def _send_error(send: Callable[[dict], Awaitable[None]], error: ApiError) -> None:
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ShedLog:
    """Requests shed before their body was read, logged as one line a second ("POST classify 503 x 412 in the last
    1.0 s: ..."), not one line each: under a storm, a line per refusal took a sixth of the event loop's time.
    /metrics counts every one (workbench_requests_total{status="503"})."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.counts: Counter[str] = Counter()
        self.reason = ""
        self.since = 0.0

    def count(self, route: str, error: ApiError) -> None:
        now = time.monotonic()
        if not self.counts:
            self.since = now
        self.counts[route] += 1
        self.reason = error.message
        if now - self.since >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.counts:
            for route, n in sorted(self.counts.items()):
                log.info("POST %s 503 x %d in the last %.1f s, shed before reading: %s", route, n,
                         time.monotonic() - self.since, self.reason)
            self.counts.clear()


class Guard:
    """ASGI wrapper: Host / Origin allow-list, API key, body limit and deadline, request metrics, and a JSON 500
    when anything escapes."""

    def __init__(self, app: Any, api_key: str | None, settings: ServeSettings, metrics: ServerMetrics,
                 state: "ServerState | None" = None) -> None:
        self.app, self.api_key, self.settings, self.metrics = app, api_key, settings, metrics
        self.state = state  # sheds a POST to a busy text route before its body is read (ServerState.busy)
        self.shed_log = ShedLog()

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> ApiError | None:
        """The error to answer before the app runs: a foreign site or Host, no key, a declared body too large."""
        if self.settings.allowed_hosts is not None:
            problem = cross_site_problem(headers, self.settings.allowed_hosts)
            if problem:
                return ApiError(403, problem, "permission_error", "allowed_hosts")
        if path not in OPEN_ROUTES and self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not keys_match(given.strip(), self.api_key):
                return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' (the "
                                     "key is stored in <home>/serve/api_key, mode 0600)", "authentication_error",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.settings.max_body_bytes:
            return _too_large(self.settings.max_body_bytes)
        return None

    def _limited(self, receive: Callable) -> Callable:
        """`receive` held to the body limit, and to body_timeout_s between chunks until the body is complete
        (after it, a receive waits for the disconnect: a stream may last longer)."""
        limit, timeout = self.settings.max_body_bytes, self.settings.body_timeout_s
        received, complete = [0], [False]

        async def limited_receive() -> dict:
            if complete[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge()
                complete[0] = not message.get("more_body", False)
            else:
                complete[0] = True
            return message

        return limited_receive

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = ROUTES.get(path, "other")
        start = time.perf_counter()
        status = [0]

        async def tracked_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        shed: ApiError | None = None
        try:
            refusal = self._refusal(path, {k.lower(): v for k, v in scope.get("headers", [])})
            if refusal is None and self.state is not None and scope.get("method") == "POST":
                refusal = shed = self.state.busy(path, scope)
            if refusal is not None:
                await _send_error(tracked_send, refusal)
                return
            try:
                await self.app(scope, self._limited(receive), tracked_send)
            except BodyTooLarge:
                if not status[0]:
                    await _send_error(tracked_send, _too_large(self.settings.max_body_bytes))
            except BodyTimeout:
                if not status[0]:
                    await _send_error(tracked_send, _stalled(self.settings.body_timeout_s))
        except Exception as exc:  # never a traceback to the client: one line; the frames go to the server log
            log_internal_error(route, exc)
            if not status[0]:
                await _send_error(tracked_send, ApiError(500, "internal error: the server failed on this request "
                                                              "(see the server log)", "internal_error"))
        finally:
            elapsed = time.perf_counter() - start
            if self.state is not None:
                self.state.arrived(scope)
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, status=str(status[0] or 500)).inc()
            if route not in ("other",):
                self.metrics.latency.labels(route=route).observe(elapsed)
            if shed is not None:
                self.shed_log.count(route, shed)
            else:
                self.shed_log.flush()
                log.info("%s %s %d %.1f ms", scope.get("method", ""), route, status[0] or 500, elapsed * 1000)


class ServerState:
    """What the routes share: the model once loaded, the batcher, the metrics."""

    def __init__(self, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.served: ServedModel | None = None
        self.batcher: MicroBatcher | None = None
        self.passing = 0  # text requests let in by `busy` whose texts the batcher has not counted yet
        self.generator: "GenerationScheduler | None" = None  # chat answers, when the model can batch them
        self.load_error: str | None = None
        self.created = int(time.time())

    def ready(self) -> ServedModel:
        if self.served is None:
            if self.load_error:
                raise ApiError(503, f"the model failed to load: {self.load_error}", "unavailable")
            raise ApiError(503, "the model is still loading: retry when GET /readyz answers 200", "unavailable")
        return self.served

    def busy(self, path: str, scope: dict) -> ApiError | None:
        """The 503 (with Retry-After) a request to the served text route gets when even one more text would be
        refused: answered by the Guard before the body is read, parsed and validated. Under a storm of
        requests this keeps a refusal to microseconds of the event loop's time, which the model's thread and
        the admitted requests need (refused after parsing, a storm cost the admitted ones seconds). A request let
        through counts as one text ahead of the next ones until the batcher counts its real texts (`arrived`),
        so that a burst arriving while the queue is empty is not let through whole."""
        if self.batcher is None or self.served is None or path != self.served.route or path not in TEXT_ROUTES:
            return None
        refused = self.batcher.refusal(1, ahead=self.passing)
        if refused is not None:
            self.batcher.shed += 1
            return _busy(refused)
        self.passing += 1
        scope[PASSING] = [True]  # a list: the same object in every copy of the scope the app makes
        return None

    def arrived(self, scope: dict) -> None:
        """The request's texts are counted by the batcher now (or it ended before): no longer ahead of others."""
        token = scope.get(PASSING)
        if token and token[0]:
            token[0] = False
            self.passing -= 1

    def run_batch(self, texts: list[str]) -> list[Any]:
        """One micro-batch on the model thread: the outputs, and the token counts for /metrics."""
        served = self.ready()
        self.metrics.tokens_in.inc(sum(served.count_tokens(texts)))
        outputs = served.run(texts)
        if served.spec.generates:
            self.metrics.tokens_out.inc(sum(served.count_tokens(outputs, truncate=False)))
        return outputs

    def serving(self, path: str) -> Callable[[], Awaitable[ServedModel]]:
        """A dependency of the route at `path`: the loaded model, when its task answers there (else a 404 naming
        the route it answers on; a 503 while it loads). FastAPI runs it before it validates the body's fields."""

        async def served() -> ServedModel:
            model = self.ready()
            if model.route != path:
                raise ApiError(404, f"run {model.run_id} is a {model.task} run: it answers on {model.route}, not "
                                    f"{path}", "not_found")
            return model

        return served


# --- requests in, answers out ----------------------------------------------------------------------------

class CheckedRequest(Request):
    """A request whose JSON body is read by `inputs.parse_json` (bounded nesting and integers, UTF-8), once."""

    async def json(self) -> Any:
        if not hasattr(self, "checked_json"):
            try:
                self.checked_json = parse_json(await self.body())
            except InputError as exc:
                raise ApiError(422, str(exc)) from None
        return self.checked_json


class CheckedRoute(APIRoute):
    """A route that reads its body as a CheckedRequest before FastAPI validates it against the route's model:
    FastAPI answers any failure while it reads a body as a wordless 400, so the body is parsed first, here,
    where a refusal is the 422 naming the problem.

    The body is JSON whatever its Content-Type says: FastAPI reads JSON only under a JSON Content-Type, and
    `curl -d` (the README's example) sends form-urlencoded, which this API has always read. No weaker for it:
    a page of another site cannot send the key without a CORS preflight, and a server without a key refuses
    other sites outright (connections.py)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()
        takes_body = self.body_field is not None

        async def checked(request: Request) -> Response:
            if takes_body:
                headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
                request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            request = CheckedRequest(request.scope, request.receive)
            if takes_body:
                await request.json()
            return await handle(request)

        return checked


def _busy(exc: QueueFull) -> ApiError:
    return ApiError(503, f"the server is busy ({exc})", "overloaded", exc.limit_name,
                    headers={"Retry-After": str(exc.retry_after)})


def _late(timeout_s: float) -> ApiError:
    return ApiError(504, f"the model did not answer within request_timeout_s={timeout_s:g} s: the server "
                         "is overloaded; retry later or send fewer texts per request", "timeout", "request_timeout_s")


async def _queued(work: Awaitable[Any]) -> Any:
    """The batcher's answer; a full queue is 503 with Retry-After, a passed deadline 504."""
    try:
        return await work
    except QueueFull as exc:
        raise _busy(exc) from None
    except QueueTimeout as exc:
        raise _late(exc.timeout_s) from None


def _observe(metrics: ServerMetrics, outputs: list[Any]) -> None:
    """What /metrics and drift count of a text route's answers: labels, values (regression), entity types."""
    answers = [o for o in outputs if isinstance(o, dict)]
    # an abstained answer counts under its top class (the drift signal is what the model saw, not the threshold)
    metrics.observe_labels([a.get("top_label", a["label"]) for a in answers if "label" in a]
                           + [e["type"] for a in answers for e in a.get("entities", ())])
    metrics.observe_values([a["value"] for a in answers if "value" in a])


@dataclass(frozen=True)
class TextRoute:
    """What differs between the text routes (each takes {"texts": [...]} to the micro-batcher): the answer's
    model, and how the served model's outputs are wrapped in it."""

    summary: str
    response: type[BaseModel]
    wrap: Callable[[ServedModel, list[str], list[Any]], dict[str, Any]]


TEXT_ROUTES: dict[str, TextRoute] = {
    "/v1/classify": TextRoute(
        "A label and each label's score per text (a value per text, for text regression)",
        ClassifyResponse,
        lambda served, texts, outputs: {"model": served.run_id, "artifact": served.artifact, "results": outputs}),
    "/v1/translate": TextRoute(
        "A translation per text", TranslateResponse,
        lambda served, texts, outputs: {"model": served.run_id, "translations": outputs}),
    "/v1/ner": TextRoute(
        "The entities of each text, with character offsets", NerResponse,
        lambda served, texts, outputs: {"model": served.run_id, "results": [
            {"text": text, "entities": out["entities"]} for text, out in zip(texts, outputs)]}),
}


def route_label(path: str) -> str:
    """A route's name in /metrics and the log: its first word after /v1/ ("/v1/chat/completions" -> chat)."""
    parts = path.strip("/").split("/")
    return parts[1] if parts[0] == "v1" else parts[0]


ROUTES = {path: route_label(path) for path in ("/healthz", "/readyz", "/metrics", "/v1/models", *TEXT_ROUTES,
                                                CHAT_ROUTE, EXPLAIN_ROUTE)}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": words} for status, words in [
        (401, "no key, or a wrong one"), (404, "another task's route: the message names this run's"),
        (413, "a limit passed: the body, max_texts, max_chars, max_messages"), (422, "a body the model refuses"),
        (503, "the model is loading, or the queue is full (Retry-After)"), (504, "no answer within the deadline")]}


# --- the app ---------------------------------------------------------------------------------------------

def create_app(loader: Callable[[], ServedModel] | ServedModel, settings: ServeSettings | None = None,
               api_key: str | None = None, baseline: Callable[[ServedModel], Baseline | None] | None = None
               ) -> tuple[Any, ServerState]:
    """The ASGI app (the FastAPI app inside its Guard) and its state.

    `loader` builds the model on a background thread once the server runs (/readyz says 503 until then),
    or is an already loaded ServedModel. `baseline` gives the drift baseline of the loaded model.
    `api_key=None` switches authentication off (the caller allows that on loopback only).
    """
    from fastapi import FastAPI
    from fastapi.security import HTTPBearer

    settings = settings or ServeSettings()
    metrics = ServerMetrics()
    state = ServerState(settings, metrics)
    app = FastAPI(title="LLM Workbench serving API", version="1", lifespan=_lifespan(loader, state, baseline),
                  description="One trained run, served: the routes of its task answer, the others say which "
                              "route it answers on. Every route but /healthz, /docs and /openapi.json needs "
                              "`Authorization: Bearer <key>` (the Authorize button).",
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json", swagger_ui_oauth2_redirect_url=None)
    app.router.route_class = CheckedRoute
    # the guard checks the key; declared here so the schema shows it and /docs sends it
    keyed = [Depends(HTTPBearer(auto_error=False, description="the server's API key"))]
    requests = request_bodies(settings.max_texts, settings.max_chars, settings.max_messages,
                                     settings.max_tokens)
    _add_error_handlers(app, settings)
    _add_info_routes(app, state, keyed)
    for path, route in TEXT_ROUTES.items():
        _add_text_route(app, state, keyed, path, route, requests.texts)
    _add_chat_route(app, state, keyed, requests.chat)
    _add_explain_route(app, state, keyed, requests.explain)
    return Guard(app, api_key, settings, metrics, state), state


def abstain(served: ServedModel, below: float) -> None:
    """Serve with this abstain threshold instead of the run's own: a classifier whose (calibrated) top-class
    probability is under it answers "uncertain". A run without a fitted temperature is wrapped at temperature
    1. Refused for a model without class probabilities."""
    if hasattr(served.predictor, "abstain_below"):
        served.predictor.abstain_below = below
        return
    if not served.spec.classes:
        raise WorkbenchError(f"run {served.run_id} ({served.task}) gives no class probabilities to abstain on: "
                             "serve it without abstain_below")
    from ..calibration import CalibratedPredictor

    served.predictor = CalibratedPredictor(served.predictor, 1.0, below)


def _lifespan(loader: Callable[[], ServedModel] | ServedModel, state: ServerState,
              baseline: Callable[[ServedModel], Baseline | None] | None) -> Callable[[Any], Any]:
    """Startup: the batcher, and the model loaded (on a thread unless given); shutdown after uvicorn drained."""
    from contextlib import asynccontextmanager

    settings, metrics = state.settings, state.metrics

    def load() -> None:
        try:
            served = loader if isinstance(loader, ServedModel) else loader()
            if settings.abstain_below is not None:
                abstain(served, settings.abstain_below)
            metrics.set_model(served.labels, baseline(served) if baseline else None)
            if served.batches_generation():
                state.generator = served.scheduler(settings.max_generation_batch, settings.max_queue,
                                                   metrics.batch_size.observe).start()
            state.served = served
            log.info("model ready: run %s (%s, %s)", served.run_id, served.task, served.artifact)
        except Exception as exc:
            state.load_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.error("model failed to load: %s", state.load_error)

    @asynccontextmanager
    async def lifespan(app: Any):
        state.batcher = MicroBatcher(state.run_batch, settings.max_batch_size, settings.max_wait_ms,
                                     metrics.batch_size.observe, max_queue=settings.max_queue,
                                     timeout_s=settings.request_timeout_s,
                                     max_queue_wait_s=settings.max_queue_wait_s)
        await state.batcher.start()
        if isinstance(loader, ServedModel):
            load()
        else:
            threading.Thread(target=load, name="model-load", daemon=True).start()
        try:
            yield
        finally:
            await state.batcher.stop()
            if state.generator is not None:
                await asyncio.to_thread(state.generator.stop)

    return lifespan


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(json.loads(error.body()), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: Any, settings: ServeSettings) -> None:
    """Every failure answers as a JSON error naming the problem; no traceback ever reaches a client."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}: see GET /v1/models and the routes of this run's task",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                        str(exc.detail))
        return _error_response(ApiError(exc.status_code, message, "not_found" if exc.status_code == 404
                                        else "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if not errors:
            return _error_response(ApiError(422, "malformed request: check the fields and their types"))
        refused = refusal(errors[0])  # the first problem, in words; the client fixes one at a time
        return _error_response(ApiError(refused.status, refused.message,
                                        "limit_exceeded" if refused.limit else "invalid_request_error",
                                        refused.limit))

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error_response(_too_large(settings.max_body_bytes))

    @app.exception_handler(BodyTimeout)
    async def _body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        return _error_response(_stalled(settings.body_timeout_s))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log_internal_error(request.url.path, exc)
        return _error_response(ApiError(500, "internal error: the server failed on this request (see the server "
                                             "log)", "internal_error"))


def _add_info_routes(app: Any, state: ServerState, keyed: list[Any]) -> None:
    @app.get("/healthz", response_model=Health, summary="The process answers (no key needed)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, summary="The model is loaded", dependencies=keyed,
             responses={503: ERRORS[503]})
    async def readyz() -> dict[str, Any]:
        served = state.ready()
        return {"status": "ready", "run": served.run_id, "task": served.task, "route": served.route,
                "artifact": served.artifact, "marked": bool(served.info.get("marked"))}

    @app.get("/metrics", response_class=Response, dependencies=keyed,
             summary="Prometheus metrics: requests, latency, batches, tokens, labels, drift",
             responses={200: {"content": {"text/plain": {}}, "description": "the Prometheus text format"}})
    async def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, summary="The served run, as OpenAI lists models",
             dependencies=keyed, responses={503: ERRORS[503]})
    async def models() -> dict[str, Any]:
        served = state.ready()
        return {"object": "list", "data": [{"id": served.run_id, "object": "model", "created": state.created,
                                            "owned_by": "workbench", "task": served.task,
                                            "artifact": served.artifact}]}


def _add_text_route(app: Any, state: ServerState, keyed: list[Any], path: str, route: TextRoute,
                    body_model: type[BaseModel]) -> None:
    """One text route: {"texts": [...]} through the micro-batcher, the outputs wrapped as `route` says."""
    settings, metrics = state.settings, state.metrics

    async def answer(body: body_model, request: Request,
                     served: ServedModel = Depends(state.serving(path))) -> dict[str, Any]:
        texts = body.texts
        metrics.observe_inputs([len(t) for t in texts])
        if settings.log_text:
            log.info("%s texts: %s", ROUTES[path], json.dumps(mask_value(texts))[:2000])
        state.arrived(request.scope)  # its texts are counted by submit, in this same step of the event loop
        outputs = await _queued(state.batcher.submit(texts))
        metrics.texts.inc(len(texts))
        _observe(metrics, outputs)
        return route.wrap(served, texts, outputs)

    app.post(path, name=ROUTES[path], summary=route.summary, response_model=route.response, dependencies=keyed,
             responses=ERRORS, response_model_exclude_unset=True)(answer)  # "abstained" only when it did


def _add_explain_route(app: Any, state: ServerState, keyed: list[Any], body_model: type[BaseModel]) -> None:
    """/v1/explain: word attributions of the served model's answers (workbench.explain), one request at a time
    on a worker thread (each costs about `steps` forward and backward passes), within the request deadline."""
    settings = state.settings
    one_at_a_time = asyncio.Semaphore(1)

    async def explaining() -> ServedModel:
        model = state.ready()
        if model.spec.kind not in ("encoder", "tokens"):
            raise ApiError(404, f"run {model.run_id} is a {model.task} run: explanations cover runs that classify, "
                                f"score or tag texts; it answers on {model.route}", "not_found")
        return model

    @app.post(EXPLAIN_ROUTE, name=ROUTES[EXPLAIN_ROUTE], summary="Each word's push toward the answer",
              response_model=ExplainResponse, dependencies=keyed, responses=ERRORS)
    async def explain_route(body: body_model, served: ServedModel = Depends(explaining)) -> dict[str, Any]:
        from ..explain import explain_predictor

        if settings.log_text:
            log.info("explain texts: %s", json.dumps(mask_value(body.texts))[:2000])

        def work() -> list[dict[str, Any]]:
            return explain_predictor(served.predictor, body.texts, target=body.target, method=body.method,
                                     steps=body.steps)

        try:
            async with one_at_a_time:
                results = await asyncio.wait_for(asyncio.to_thread(work), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"no explanation within {settings.request_timeout_s:g} s (request_timeout_s): send "
                                "fewer or shorter texts, or fewer steps", "timeout", "request_timeout_s") from None
        except WorkbenchError as exc:
            raise ApiError(422, str(exc)) from None
        return {"model": served.run_id, "artifact": served.artifact, "results": results}


def _add_chat_route(app: Any, state: ServerState, keyed: list[Any], body_model: type[BaseModel]) -> None:
    from fastapi.responses import StreamingResponse

    settings, metrics = state.settings, state.metrics
    events = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "with stream: true, server-sent events of chat.completion.chunk, then [DONE]"}

    @app.post(CHAT_ROUTE, name=ROUTES[CHAT_ROUTE], summary="An OpenAI chat completion",
              response_model=ChatCompletion, dependencies=keyed, responses={**ERRORS, 200: events})
    async def chat(body: body_model, served: ServedModel = Depends(state.serving(CHAT_ROUTE))) -> Any:
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_tokens = asked or min(served.max_new_tokens, settings.max_tokens)
        temperature, top_p = float(body.temperature or 0.0), float(1.0 if body.top_p is None else body.top_p)
        if settings.log_text:
            log.info("chat messages: %s", json.dumps(mask_value(messages))[:2000])
        metrics.observe_inputs([len(messages[-1]["content"])])
        prompt_tokens = served.count_prompt_tokens(messages)
        metrics.tokens_in.inc(prompt_tokens)
        completion_id, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if state.generator is not None:
            return await _generated(state, served, messages, max_tokens, (temperature, top_p), body.stream,
                                    completion_id, created, prompt_tokens)
        if body.stream:
            return StreamingResponse(
                _stream(served, metrics, messages, max_tokens, completion_id, created, (temperature, top_p)),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        def work() -> str:
            metrics.batch_size.observe(1)
            return served.answer(messages, max_tokens, temperature, top_p)

        answer = await _queued(state.batcher.run_alone(work))
        completion_tokens = sum(served.count_tokens([answer], truncate=False)) if answer else 0
        metrics.tokens_out.inc(completion_tokens)
        metrics.texts.inc()
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": served.run_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "length" if completion_tokens >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


async def _generated(state: ServerState, served: ServedModel, messages: list[dict[str, str]], max_tokens: int,
                     sampling: tuple[float, float], stream: bool, completion_id: str, created: int,
                     prompt_tokens: int) -> Any:
    """A chat answer from the generation thread, whose decode steps the concurrent requests share: whole
    within request_timeout_s (504), or streamed once its first piece came within it. The slot is freed
    when the answer ends, the deadline passes or the client goes away."""
    from fastapi.responses import StreamingResponse

    settings, metrics = state.settings, state.metrics
    assert state.generator is not None
    try:
        prompt = served.prompt_ids(messages)
    except WorkbenchError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        ticket = state.generator.submit(prompt, max_tokens, *sampling)
    except QueueFull as exc:
        raise _busy(exc) from None
    try:
        if stream:
            first = await asyncio.wait_for(ticket.next(), settings.request_timeout_s)
        else:
            answer = await asyncio.wait_for(ticket.text(), settings.request_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        ticket.cancel()
        raise _late(settings.request_timeout_s) from None
    except BaseException:
        ticket.cancel()
        raise
    if stream:
        return StreamingResponse(_ticket_events(served, metrics, ticket, first, completion_id, created),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    assert ticket.result is not None
    completion_tokens = ticket.result.completion_tokens
    metrics.tokens_out.inc(completion_tokens)
    metrics.texts.inc()
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": served.run_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": ticket.result.finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _chunk(served: ServedModel, completion_id: str, created: int, delta: dict[str, Any],
           finish: str | None = None) -> str:
    """One server-sent event of a streamed chat completion."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": served.run_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


STREAM_ERROR = {"error": {"message": "internal error while generating", "type": "internal_error"}}


async def _ticket_events(served: ServedModel, metrics: ServerMetrics, ticket: "Ticket", first: str | None,
                         completion_id: str, created: int):
    """Server-sent events of a generation thread's answer: each piece as its tokens are generated."""
    try:
        yield _chunk(served, completion_id, created, {"role": "assistant", "content": ""})
        piece = first
        while piece is not None:
            yield _chunk(served, completion_id, created, {"content": piece})
            try:
                piece = await ticket.next()
            except Exception as exc:
                log_internal_error("chat stream", exc)
                yield f"data: {json.dumps(STREAM_ERROR)}\n\n"
                return
        assert ticket.result is not None
        metrics.tokens_out.inc(ticket.result.completion_tokens)
        metrics.texts.inc()
        yield _chunk(served, completion_id, created, {}, ticket.result.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a client that went away frees its row at the next decode step


async def _stream(served: ServedModel, metrics: ServerMetrics, messages: list[dict[str, str]], max_tokens: int,
                  completion_id: str, created: int, sampling: tuple[float, float] = (0.0, 1.0)):
    """Server-sent events of an OpenAI chat completion: the model's pieces as they are generated."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:  # the model's thread: pieces go to the event loop as they come
        try:
            metrics.batch_size.observe(1)
            for piece in served.stream(messages, max_tokens, stop, *sampling):
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
        except Exception as exc:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _chunk(served, completion_id, created, delta, finish)

    thread = threading.Thread(target=produce, name="chat-stream", daemon=True)
    text = []
    try:
        yield chunk({"role": "assistant", "content": ""})
        thread.start()
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                text.append(value)
                yield chunk({"content": value})
            elif kind == "error":
                log_internal_error("chat stream", value)
                yield f"data: {json.dumps(STREAM_ERROR)}\n\n"
                return
            else:
                break
        completion_tokens = sum(served.count_tokens(["".join(text)], truncate=False)) if text else 0
        metrics.tokens_out.inc(completion_tokens)
        metrics.texts.inc()
        yield chunk({}, "length" if completion_tokens >= max_tokens else "stop")
        yield "data: [DONE]\n\n"
    finally:
        stop.set()  # a client that went away stops the generation at its next token
