"""`llama2 serve`: an OpenAI-compatible HTTP server with continuous batching, a safety filter and a chat page.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus text) and GET / (a web chat page). One `llama2.batching.BatchEngine` thread owns the
model: every request's sequences join its running batch after their prefill and leave when done;
a streaming client that disconnects is cancelled. Prompts go through the same `ChatFormat` as
`llama2 chat` (forged turns are refused with 400). With `--safety-rm` or `--safety-classifier`
the prompt and the answer are scored (Llama 2 §5.3: input and output filtering) and an answer
below `--safety-threshold` is replaced with a fixed refusal; streamed answers are then buffered
and sent after the check. See docs/serving.md.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from llama2.batching import BatchEngine, Event, FinishEvent, TokenEvent
from llama2.chat_format import ChatFormat, ChatFormatError, Dialog
from llama2.compiled_decode import COMPILE_HELP
from llama2.config import load_object
from llama2.generation import SamplingParams
from llama2.inference import load_for_inference
from llama2.reward_scoring import RewardScorer

log = logging.getLogger("llama2.serve")

REFUSAL = "I'm sorry, but I can't help with that request."
PAGE = Path(__file__).resolve().parent / "serve_static" / "index.html"
OPEN_PATHS = ("/health", "/")  # served without an API key (the page holds no data; it asks for the key)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


# ----------------------------------------------------------------------------- request bodies


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both completion routes share (unknown fields are ignored, as OpenAI clients send extras)."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return v


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ----------------------------------------------------------------------------- metrics


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Counters, gauges and histograms, rendered in Prometheus' text format."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.safety_replacements: dict[str, int] = {"input": 0, "output": 0}
        self.ttft = Histogram(self.BUCKETS)
        self.latency = Histogram(self.BUCKETS)
        self._last = (time.perf_counter(), 0)  # (time, engine tokens) at the previous scrape

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1

    def render(self, engine: BatchEngine, inflight: int) -> str:
        with self.lock:
            now, generated = time.perf_counter(), engine.generated_tokens
            t0, n0 = self._last
            tps = (generated - n0) / (now - t0) if now > t0 else 0.0
            self._last = (now, generated)
            lines = ["# HELP llama2_requests_total HTTP requests by route and status.",
                     "# TYPE llama2_requests_total counter"]
            lines += [f'llama2_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += ["# TYPE llama2_prompt_tokens_total counter", f"llama2_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE llama2_completion_tokens_total counter",
                      f"llama2_completion_tokens_total {self.completion_tokens}",
                      "# TYPE llama2_generated_tokens_total counter", f"llama2_generated_tokens_total {generated}",
                      "# HELP llama2_tokens_per_second Generated tokens per second since the previous scrape.",
                      "# TYPE llama2_tokens_per_second gauge", f"llama2_tokens_per_second {tps:.3f}",
                      "# HELP llama2_queue_length Sequences waiting to join the running batch.",
                      "# TYPE llama2_queue_length gauge", f"llama2_queue_length {engine.queued}",
                      "# TYPE llama2_active_sequences gauge", f"llama2_active_sequences {engine.active}",
                      "# TYPE llama2_inflight_requests gauge", f"llama2_inflight_requests {inflight}",
                      "# HELP llama2_safety_replacements_total Answers replaced with the refusal, by check.",
                      "# TYPE llama2_safety_replacements_total counter"]
            lines += [f'llama2_safety_replacements_total{{stage="{k}"}} {v}'
                      for k, v in sorted(self.safety_replacements.items())]
            lines += ["# HELP llama2_time_to_first_token_seconds From request to first generated token.",
                      "# TYPE llama2_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("llama2_time_to_first_token_seconds")
            lines += ["# TYPE llama2_request_latency_seconds histogram"]
            lines += self.latency.lines("llama2_request_latency_seconds")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- safety


class SafetyFilter:
    """Scores (messages, answer) with a safety reward model or a classifier; below `threshold` is unsafe.

    A reward model's score is its sigmoid, in [0, 1] (`RewardScorer.prob`, the form the PPO safety
    gate thresholds). The prompt alone is checked with an empty answer."""

    def __init__(self, score: Callable[[Dialog, str], float], threshold: float):
        self.score, self.threshold = score, threshold
        self.lock = threading.Lock()

    @classmethod
    def from_reward_model(cls, path: str, threshold: float, device: str = "cpu", chat_format: str = "auto"):
        scorer = RewardScorer(path, device=device, chat_format=chat_format)
        return cls(lambda messages, answer: float(scorer.prob([messages], [answer])[0]), threshold)

    def _safe(self, messages: Dialog, answer: str) -> tuple[bool, float]:
        with self.lock:
            try:
                s = float(self.score(messages, answer))
            except ChatFormatError as e:  # e.g. a raw completion prompt the chat format refuses
                log.warning("safety filter cannot score the dialog (%s): treated as unsafe", e)
                return False, float("nan")
        return s >= self.threshold, s

    async def safe(self, messages: Dialog, answer: str) -> tuple[bool, float]:
        return await asyncio.to_thread(self._safe, messages, answer)


# ----------------------------------------------------------------------------- the server state


@dataclass
class Limits:
    max_concurrent: int = 64
    max_tokens: int = 1024
    max_request_bytes: int = 1 << 20


class Job:
    """The sequences of one request in the engine; their events arrive on an asyncio queue."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.ids: list[int] = []
        self.open: set[int] = set()

    def submit(self, prompt: list[int], params: SamplingParams, top_logprobs: int = 0) -> None:
        index = len(self.ids)
        put = self.queue.put_nowait

        def on_event(ev: Event, index: int = index) -> None:  # called on the engine thread
            self.loop.call_soon_threadsafe(put, (index, ev))

        self.open.add(index)
        self.ids.append(self.server.engine.submit(prompt, params, on_event, top_logprobs))

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Every (choice index, event) until all choices finished; stops early if the client went away."""
        while self.open:
            try:
                index, ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return
                continue
            if isinstance(ev, FinishEvent):
                self.open.discard(index)
            yield index, ev

    def cancel(self) -> None:
        for index in list(self.open):
            self.server.engine.cancel(self.ids[index])


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    first_token_s: float | None = None


class SlotResponse(StreamingResponse):
    """A streamed answer that gives its concurrency slot back however the response ends: sent,
    failed, or a client gone before the first chunk (then the body's generator never runs, and
    its own `finally` with it)."""

    def __init__(self, content, release: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class Server:
    def __init__(self, model, tokenizer, fmt: ChatFormat, model_name: str, limits: Limits,
                 api_key: str | None = None, safety: SafetyFilter | None = None, max_batch: int = 64,
                 compile: bool = False):
        self.model, self.tokenizer, self.fmt, self.model_name = model, tokenizer, fmt, model_name
        self.limits, self.api_key, self.safety = limits, api_key, safety
        self.engine = BatchEngine(model, tokenizer, max_batch=max_batch, compile=compile)
        self.metrics = Metrics()
        self.inflight = 0
        self.created = int(time.time())

    # -- admission --------------------------------------------------------------------------------
    def acquire(self) -> None:
        if self.inflight >= self.limits.max_concurrent:
            raise APIError(429, f"too many concurrent requests (limit {self.limits.max_concurrent}); retry later",
                           kind="rate_limit_error")
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    def max_new_tokens(self, asked: int | None, prompt_len: int, field: str = "max_tokens") -> int:
        ctx = self.model.args.max_seq_len
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {ctx}", "messages")
        if asked is None:
            return min(self.limits.max_tokens, ctx - prompt_len)
        if asked > self.limits.max_tokens:
            raise APIError(400, f"{field}={asked} is above this server's limit of {self.limits.max_tokens}", field)
        if prompt_len + asked > ctx:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus {field}={asked} exceeds the model's "
                                f"context of {ctx} tokens", field)
        return asked

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    # -- generation -------------------------------------------------------------------------------
    async def run(self, job: Job, n: int, request: Request, logprobs: bool) -> list[Choice]:
        """Wait for the job's n choices (choices that never ran stay empty)."""
        choices = [Choice(logprobs=[] if logprobs else None) for _ in range(n)]
        async for index, ev in job.events(request):
            c = choices[index]
            if isinstance(ev, TokenEvent):
                if c.logprobs is not None:
                    c.logprobs.append((ev.token, ev.logprob, ev.top_logprobs))
            else:
                c.text, c.tokens, c.finish_reason = ev.text, len(ev.tokens), ev.finish_reason
                c.first_token_s = ev.first_token_s
        return choices

    def account(self, start: float, prompt_tokens: int, choices: list[Choice]) -> None:
        with self.metrics.lock:
            self.metrics.prompt_tokens += prompt_tokens
            self.metrics.completion_tokens += sum(c.tokens for c in choices)
            firsts = [c.first_token_s for c in choices if c.first_token_s is not None]
            if firsts:
                self.metrics.ttft.observe(min(firsts))
            self.metrics.latency.observe(time.perf_counter() - start)

    async def check_input(self, dialog: Dialog) -> bool:
        if self.safety is None:
            return True
        ok, score = await self.safety.safe(dialog, "")
        if not ok:
            self.replaced("input", score)
        return ok

    async def check_output(self, dialog: Dialog, answer: str) -> bool:
        if self.safety is None:
            return True
        ok, score = await self.safety.safe(dialog, answer)
        if not ok:
            self.replaced("output", score)
        return ok

    def replaced(self, stage: str, score: float) -> None:
        with self.metrics.lock:
            self.metrics.safety_replacements[stage] += 1
        log.info("safety filter: %s scored %.4f < %.4f, answer replaced with the refusal", stage, score,
                 self.safety.threshold)


# ----------------------------------------------------------------------------- the ASGI gate


Authorize = Callable[[dict[str, str], str], str | None]  # (lower-cased headers, path) -> None or the 401 message


def bearer(headers: dict[str, str]) -> str:
    """The token of an `Authorization: Bearer TOKEN` header ("" when there is none)."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def api_key_check(key: str | None, open_paths: tuple[str, ...] = OPEN_PATHS) -> Authorize:
    """`llama2 serve`'s rule: with a key, every path but `open_paths` needs `Authorization: Bearer KEY`."""

    def authorize(headers: dict[str, str], path: str) -> str | None:
        if not key or path in open_paths or hmac.compare_digest(bearer(headers).encode(), key.encode()):
            return None
        return "missing or wrong API key: send `Authorization: Bearer KEY`"

    return authorize


class Gate:
    """Outermost layer: authorization (401), request body size (413) and per-route request counts.

    `authorize` defaults to the server's API key; `llama2 annotate serve` passes its per-annotator check."""

    def __init__(self, app, server: Server, authorize: Authorize | None = None, routes: tuple[str, ...] = ROUTES):
        self.app, self.server, self.routes = app, server, routes
        self.authorize = authorize or api_key_check(server.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, send_counted, path)
        finally:
            self.server.metrics.request(route, status["code"])

    async def _gate(self, scope, receive, send, path):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self.authorize(headers, path)
        if refused is not None:
            return await reply(send, 401, error_body(refused, "authentication_error"))
        limit = self.server.limits.max_request_bytes
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return await reply(send, 413, error_body(f"request body of {declared} bytes is above the limit of "
                                                         f"{limit} bytes"))
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await reply(send, 413, error_body(f"request body is above the limit of {limit} bytes"))
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


async def reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ----------------------------------------------------------------------------- the app


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """APIError -> its status with an OpenAI-style error body; invalid fields -> 422 naming the first field."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        body = error_body(f"invalid field {field}: {first.get('msg', 'invalid request')}", param=field)
        body["detail"] = jsonable_encoder(errors, custom_encoder={Exception: str})
        return JSONResponse(body, status_code=422)


def create_app(server: Server) -> Gate:
    """The FastAPI app behind the Gate (API key, body size, request counts)."""
    app = FastAPI(title="llama2 serve", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.engine, server.inflight),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "llama2", "max_model_len": server.model.args.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        dialog: Dialog = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = server.fmt.prompt_ids(dialog)  # the check `llama2 chat` makes: roles, forged turns
        except ChatFormatError as e:
            raise APIError(400, str(e), "messages") from None
        asked, field = (req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens \
            else (req.max_tokens, "max_tokens")
        base = SamplingParams.for_chat(server.fmt, max_new_tokens=server.max_new_tokens(asked, len(ids), field),
                                       temperature=req.temperature, top_p=req.top_p)
        params = [replace(base, stop_strings=base.stop_strings + req.stops(),
                          seed=None if req.seed is None else req.seed + i) for i in range(req.n)]
        top = (req.top_logprobs or 0) if req.logprobs else 0
        return await respond(server, request, req, "chat", [(ids, dialog, params)], top, req.logprobs)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        tok = server.tokenizer
        jobs = []
        for p in prompts:
            ids = tok.encode(p, bos=getattr(tok, "add_bos", True))
            if not ids:
                raise APIError(400, "the prompt is empty", "prompt")
            base = SamplingParams(stop_ids=(tok.eos_id,), max_new_tokens=server.max_new_tokens(req.max_tokens, len(ids)),
                                  temperature=req.temperature, top_p=req.top_p, stop_strings=req.stops())
            params = [replace(base, seed=None if req.seed is None else req.seed + i) for i in range(req.n)]
            jobs.append((ids, [{"role": "user", "content": p}], params))
        top = req.logprobs or 0
        return await respond(server, request, req, "text", jobs, top, req.logprobs is not None)

    return Gate(app, server)


async def respond(server: Server, request: Request, req: Sampling, kind: str,
                  prompts: list[tuple[list[int], Dialog, list[SamplingParams]]], top: int, want_logprobs: bool):
    """Run every (prompt, n params) of a request and answer as JSON or as server-sent events."""
    server.acquire()
    start = time.perf_counter()
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    n_total = sum(len(p) for _, _, p in prompts)
    prompt_tokens = sum(len(ids) for ids, _, _ in prompts)
    job = Job(server)
    owner: list[int] = []  # prompt number of each choice
    refused: set[int] = set()  # choices refused at the input check (never generated)

    async def submit_all() -> None:
        for k, (ids, dialog, params) in enumerate(prompts):
            ok = await server.check_input(dialog)
            for p in params:
                if not ok:  # never generated; job.ids keeps a placeholder so indices stay choice numbers
                    refused.add(len(owner))
                    job.ids.append(-1)
                else:
                    job.submit(ids, p, top)
                owner.append(k)

    def usage(choices: list[Choice]) -> dict:
        done = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    def logprob_entries(c: Choice) -> dict | None:
        if not want_logprobs or c.logprobs is None:
            return None
        t = server.token_text
        if kind == "chat":
            return {"content": [{"token": t(i), "logprob": lp, "bytes": list(t(i).encode()),
                                 "top_logprobs": [{"token": t(j), "logprob": v, "bytes": list(t(j).encode())}
                                                  for j, v in tops]} for i, lp, tops in c.logprobs]}
        offsets, pos = [], 0
        for i, _, _ in c.logprobs:
            offsets.append(pos)
            pos += len(t(i))
        return {"tokens": [t(i) for i, _, _ in c.logprobs], "token_logprobs": [lp for _, lp, _ in c.logprobs],
                "top_logprobs": [{t(j): v for j, v in tops} for _, _, tops in c.logprobs] if top else None,
                "text_offset": offsets}

    async def finalise(choices: list[Choice]) -> None:
        """Refusals for refused prompts, the output check, logprobs dropped from replaced answers."""
        for i, c in enumerate(choices):
            if i in refused or c.finish_reason != "cancelled" and not await server.check_output(prompts[owner[i]][1], c.text):
                c.text, c.finish_reason, c.logprobs = REFUSAL, "content_filter", None

    def choice_body(i: int, c: Choice) -> dict:
        body = {"index": i, "logprobs": logprob_entries(c), "finish_reason": c.finish_reason}
        if kind == "chat":
            body["message"] = {"role": "assistant", "content": c.text}
        else:
            body["text"] = c.text
        return body

    def chunk(i: int, text: str | None, finish: str | None = None, logprobs=None, role: bool = False) -> dict:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            ch = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            ch = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {"id": rid, "object": obj + ".chunk" if kind == "chat" else obj, "created": created,
                "model": server.model_name, "choices": [ch]}

    if not req.stream:
        try:
            await submit_all()
            choices = await server.run(job, n_total, request, want_logprobs)
            await finalise(choices)
            server.account(start, prompt_tokens, choices)
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": server.model_name,
                                 "choices": [choice_body(i, c) for i, c in enumerate(choices)],
                                 "usage": usage(choices)})
        finally:
            job.cancel()
            server.release()

    buffered = server.safety is not None
    released = False

    def release_once() -> None:
        nonlocal released
        if not released:
            released = True
            server.release()

    async def stream() -> AsyncIterator[str]:
        try:
            await submit_all()
            choices = [Choice(logprobs=[] if want_logprobs else None) for _ in range(n_total)]
            if kind == "chat":
                for i in range(n_total):
                    yield sse(chunk(i, None, role=True))
            for i in refused:
                choices[i].finish_reason = "content_filter"
            async for i, ev in job.events(request):
                c = choices[i]
                if isinstance(ev, TokenEvent):
                    if c.first_token_s is None:
                        c.first_token_s = time.perf_counter() - start
                    if c.logprobs is not None:
                        c.logprobs.append((ev.token, ev.logprob, ev.top_logprobs))
                    if not buffered and (ev.text or want_logprobs):
                        one = Choice(logprobs=[(ev.token, ev.logprob, ev.top_logprobs)]) if want_logprobs else c
                        yield sse(chunk(i, ev.text, logprobs=logprob_entries(one) if want_logprobs else None))
                    continue
                c.text, c.tokens, c.finish_reason = ev.text, len(ev.tokens), ev.finish_reason
                if ev.finish_reason == "cancelled":
                    return
                if buffered:
                    await finalise_one(i, c)
                    yield sse(chunk(i, c.text, logprobs=logprob_entries(c)))
                elif ev.rest:
                    yield sse(chunk(i, ev.rest))
                yield sse(chunk(i, None, c.finish_reason))
            for i in sorted(refused):
                choices[i].text = REFUSAL
                yield sse(chunk(i, REFUSAL))
                yield sse(chunk(i, None, "content_filter"))
            server.account(start, prompt_tokens, choices)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse({"id": rid, "object": obj + ".chunk" if kind == "chat" else obj, "created": created,
                           "model": server.model_name, "choices": [], "usage": usage(choices)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
            release_once()

    async def finalise_one(i: int, c: Choice) -> None:
        if not await server.check_output(prompts[owner[i]][1], c.text):
            c.text, c.finish_reason, c.logprobs = REFUSAL, "content_filter", None

    return SlotResponse(stream(), release_once, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- llama2 serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2 serve", description="An OpenAI-compatible server (chat and text "
                                "completions, streaming, continuous batching) with a web chat page at /.")
    p.add_argument("--model", help="checkpoint: native/HF/Meta directory or .gguf (default: bundled SmolLM2)")
    p.add_argument("--model-name", help="the model id clients see (default: the checkpoint's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health and /")
    key.add_argument("--api-key-file", help="read the API key from this file (keeps it out of `ps`)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight at once; more get 429")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded together; more wait in the queue")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body; more get 413")
    p.add_argument("--format", choices=["auto", "llama2", "template"], default="auto",
                   help="chat format: the model's own template if it has one (auto), or Llama 2's")
    safety = p.add_mutually_exclusive_group()
    safety.add_argument("--safety-rm", help="safety reward model checkpoint: filter prompts and answers (§5.3)")
    safety.add_argument("--safety-classifier", help="module:function(messages, answer) -> score, instead of an RM")
    p.add_argument("--safety-threshold", type=float, default=0.15,
                   help="answers scoring below this (the RM's sigmoid, or the classifier's score) are refused")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--dequantize", action="store_true",
                   help="load quantized weights as float of --dtype instead of keeping them int8/int4")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def cli(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    import uvicorn

    logging.basicConfig(level=a.log_level.upper(), format="[llama2 serve] %(levelname)s %(message)s")
    api_key = a.api_key
    if a.api_key_file:
        api_key = Path(a.api_key_file).read_text().strip()
        if not api_key:
            raise ValueError(f"{a.api_key_file}: the API key file is empty")
    for name in ("max_concurrent", "max_batch", "max_tokens_limit", "max_request_bytes"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    model, tok = load_for_inference(a.model, a.device, a.dtype, a.dequantize)
    fmt = ChatFormat(tok, a.format)
    safety = None
    if a.safety_rm:
        safety = SafetyFilter.from_reward_model(a.safety_rm, a.safety_threshold, chat_format=a.format)
    elif a.safety_classifier:
        safety = SafetyFilter(load_object(a.safety_classifier, "--safety-classifier"), a.safety_threshold)
    name = a.model_name or (Path(a.model).name if a.model else "smollm2-135m-instruct")
    limits = Limits(a.max_concurrent, a.max_tokens_limit, a.max_request_bytes)
    server = Server(model, tok, fmt, name, limits, api_key, safety, a.max_batch, a.compile)
    server.engine.start()
    if a.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", a.host)
    print(f"[llama2 serve] {name}: {model.args.num_params() / 1e6:.0f}M parameters, chat format {fmt.style}, "
          f"http://{a.host}:{a.port}/ (OpenAI API under /v1)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    finally:
        server.engine.stop()
    return 0
