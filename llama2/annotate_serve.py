"""`llama2 annotate serve`: the web annotation tool of Llama 2 §3.2.1, for human annotators.

An annotator logs in with a name and a personal key, writes a prompt (or takes the next one from
the prompt file), reads two answers A and B sampled from two distinct arms (model variant ×
temperature, in random order), picks the better one, says how much better (four ratings) and
labels safety; "continue" appends the chosen answer and asks for the next user turn, and the next
comparison is on the longer dialog. Answers come from the same continuous-batching engine as
`llama2 serve` (one `llama2.serve.Server` per model variant). Every judgement is one SQLite
transaction (`llama2.annotation_store`), answered with 200 only once committed. A share of the
prompt file is shown to several annotators with the same answers, for the agreement page
(percent agreement and Gwet's AC1 per batch). See docs/serving.md, "Annotation tool".
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama2.annotation_store import LABELS, AnnotationStore, StoreError
from llama2.chat_format import ChatFormat, ChatFormatError, Dialog
from llama2.formats import AXES, RATINGS, DataError, FieldError, check_record, iter_rows
from llama2.generation import SamplingParams
from llama2.inference import load_for_inference
from llama2.serve import APIError, Gate, Job, Limits, Server, bearer, install_error_handlers

log = logging.getLogger("llama2.annotate")

PAGE = Path(__file__).resolve().parent / "serve_static" / "annotate.html"
OPEN_PATHS = ("/", "/health")  # the page holds no data; every /api route needs an annotator's name and key
ROUTES = ("/", "/health", "/api/me", "/api/comparisons", "/api/judgements", "/api/progress", "/api/agreement")
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


# ----------------------------------------------------------------------------- annotators and prompts


def parse_annotator(spec: str, where: str) -> tuple[str, str]:
    name, sep, key = spec.partition(":")
    name, key = name.strip(), key.strip()
    if not sep or not NAME.match(name) or len(key) < 8:
        raise ValueError(f"{where}: expected NAME:KEY with NAME of letters, digits, _.@- and a key of at least "
                         f"8 characters, got {spec.split(':')[0]!r}:...")
    return name, key


def load_annotators(path: str | None, specs: list[str]) -> dict[str, str]:
    """name -> key from a file (one `name:key` a line, `#` comments) and `--annotator NAME:KEY` flags."""
    keys: dict[str, str] = {}
    entries: list[tuple[str, str]] = []
    if path:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append((line.strip(), f"{path}, line {n}"))
    entries += [(s, "--annotator") for s in specs]
    for spec, where in entries:
        name, key = parse_annotator(spec, where)
        if name in keys:
            raise ValueError(f"{where}: annotator {name!r} is given twice")
        keys[name] = key
    if not keys:
        raise ValueError("no annotators: give --annotators FILE (one name:key a line) or --annotator NAME:KEY")
    return keys


def load_prompts(path: str) -> list[dict]:
    """Prompt records (`messages` ending with a user turn; `id`, `is_safety`, `task`, `split` optional), eval split
    skipped. Missing fields get defaults, then each record is checked as a prompts record (llama2.formats)."""
    out, ids = [], set()
    for n, obj in iter_rows(path):
        if not isinstance(obj, dict):
            raise DataError(path, n, None, "a prompt must be a JSON object")
        rec = {"id": f"{Path(path).stem}-{n}", "split": "train", "batch": None, "is_safety": False,
               "risk_category": None, "attack_vector": None, "task": "human", "reference": {}, **obj}
        try:
            check_record(rec, "prompts")
        except FieldError as e:
            raise DataError(path, n, e.field, e.message) from None
        if rec["id"] in ids:
            raise ValueError(f"{path}, line {n}: duplicate prompt id {rec['id']!r}")
        ids.add(rec["id"])
        if rec["split"] != "eval":  # the eval split is never used for training data
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no prompts (besides the eval split)")
    return out


class PromptPool:
    """The prompt file: each prompt goes to one annotator, but a share `overlap` of them (a seeded choice)
    goes to `per_overlap` annotators, who see the same first answers (the agreement pairs)."""

    def __init__(self, records: list[dict], overlap: float = 0.1, per_overlap: int = 2, seed: int = 0):
        if not 0.0 <= overlap <= 1.0:
            raise ValueError(f"--overlap must be in [0, 1], got {overlap}")
        if per_overlap < 2:
            raise ValueError(f"--overlap-annotators must be at least 2, got {per_overlap}")
        self.records = records
        self.by_id = {r["id"]: r for r in records}
        order = [r["id"] for r in records]
        random.Random(seed).shuffle(order)
        self.shared = set(order[:round(overlap * len(records))])
        self.per_overlap = per_overlap

    def quota(self, prompt_id: str) -> int:
        return self.per_overlap if prompt_id in self.shared else 1

    def next_for(self, annotator: str, takers: dict[str, set[str]]) -> dict | None:
        """The next prompt for `annotator`: first a shared prompt someone else started (so its pair gets
        its second judgement), else the first prompt in file order with room left that they have not done."""
        open_ = [r for r in self.records
                 if annotator not in takers.get(r["id"], ()) and len(takers.get(r["id"], ())) < self.quota(r["id"])]
        started = [r for r in open_ if r["id"] in self.shared and takers.get(r["id"])]
        return (started or open_ or [None])[0]

    def left_for(self, annotator: str, takers: dict[str, set[str]]) -> int:
        return sum(annotator not in takers.get(i, ()) and len(takers.get(i, ())) < self.quota(i) for i in self.by_id)


# ----------------------------------------------------------------------------- request bodies


class CompareRequest(BaseModel):
    """Three ways to ask for a comparison: a new prompt (`prompt`, optional `system`), the next prompt of the
    prompt file (`next: true`), or the next user turn of a dialog whose last comparison is judged
    (`dialog_id` and `prompt`)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, max_length=20_000)
    system: str | None = Field(None, max_length=20_000)
    next: bool = False
    dialog_id: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _one_mode(self) -> CompareRequest:
        if self.next:
            if self.prompt is not None or self.dialog_id is not None or self.system is not None:
                raise ValueError("`next: true` takes no prompt, system or dialog_id")
        elif self.prompt is None or not self.prompt.strip():
            raise ValueError("give a non-empty `prompt` (with `dialog_id` to continue a dialog), or `next: true`")
        elif self.dialog_id is not None and self.system is not None:
            raise ValueError("a continued dialog keeps its system message: drop `system`")
        return self


class JudgementRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comparison_id: str = Field(max_length=64)
    choice: Literal["A", "B"]
    rating: Literal[RATINGS]  # type: ignore[valid-type]
    safety_label: Literal[LABELS]  # type: ignore[valid-type]


# ----------------------------------------------------------------------------- the tool


@dataclass(frozen=True)
class Arm:
    """One way of sampling an answer: a model variant at a temperature."""

    model: str
    temperature: float

    def as_dict(self) -> dict:
        return {"model": self.model, "temperature": self.temperature}


class Tool:
    def __init__(self, servers: dict[str, Server], temperatures: list[float], store: AnnotationStore,
                 annotators: dict[str, str], batch: int, pool: PromptPool | None = None, axis: str = "auto",
                 top_p: float = 1.0, seed: int | None = None):
        self.servers, self.store, self.annotators, self.batch, self.pool = servers, store, annotators, batch, pool
        self.axis, self.top_p = axis, top_p
        self.arms = [Arm(m, t) for m in servers for t in temperatures]
        if len(set(self.arms)) < 2:
            raise ValueError("two distinct arms are needed: give two models or two temperatures")
        self.rng = random.Random(seed)
        self._pick: asyncio.Lock | None = None
        self._prompt_locks: dict[str, asyncio.Lock] = {}

    # -- authorization (called by the Gate for every request) ------------------------------------
    def authorize(self, headers: dict[str, str], path: str) -> str | None:
        if path in OPEN_PATHS:
            return None
        name, given = headers.get("x-annotator", ""), bearer(headers)
        key = self.annotators.get(name)
        ok = hmac.compare_digest(given.encode(), (key or "\0" * 32).encode()) and key is not None
        return None if ok else "unknown annotator or wrong key: send `X-Annotator: NAME` and `Authorization: Bearer KEY`"

    # -- generation ---------------------------------------------------------------------------------
    async def answer(self, arm: Arm, messages: Dialog, request: Request) -> str:
        server = self.servers[arm.model]
        try:
            ids = server.fmt.prompt_ids(messages)
        except ChatFormatError as e:
            raise APIError(400, str(e), "prompt") from None
        params = SamplingParams.for_chat(server.fmt, max_new_tokens=server.max_new_tokens(None, len(ids)),
                                         temperature=arm.temperature, top_p=self.top_p)
        job = Job(server)
        try:
            job.submit(ids, params)
            (choice,) = await server.run(job, 1, request, False)
        finally:
            job.cancel()
        if choice.finish_reason == "cancelled":
            raise APIError(400, "the request was cancelled before both answers were ready")
        return choice.text.strip()

    def axis_of(self, record: dict | None) -> str:
        if self.axis != "auto":
            return self.axis
        return "safety" if record is not None and record.get("is_safety") else "helpfulness"

    async def compare(self, annotator: str, req: CompareRequest, request: Request) -> dict:
        store = self.store
        record = None
        if req.dialog_id is not None:  # continue a dialog with the chosen answer and a new user turn
            dialog = await asyncio.to_thread(store.dialog, req.dialog_id)
            if dialog is None or dialog["annotator"] != annotator:
                raise APIError(404, f"no dialog {req.dialog_id!r} of yours", "dialog_id")
            last = await asyncio.to_thread(store.last_comparison, req.dialog_id)
            judged = last and await asyncio.to_thread(store.judgement, last["id"])
            if not judged:
                raise APIError(409, "judge the dialog's last comparison before continuing it", "dialog_id")
            chosen = last["answer_a"] if judged["choice"] == "A" else last["answer_b"]
            messages = last["messages"] + [{"role": "assistant", "content": chosen},
                                           {"role": "user", "content": req.prompt}]
            dialog_id, turn, shared = req.dialog_id, last["turn"] + 1, None
            if dialog["prompt_id"] is not None and self.pool is not None:
                record = self.pool.by_id.get(dialog["prompt_id"])
        else:
            if req.next:
                if self.pool is None:
                    raise APIError(404, "this server has no prompt file (--prompts): write a prompt", "next")
                if self._pick is None:
                    self._pick = asyncio.Lock()
                async with self._pick:  # choose and take a prompt atomically: quotas hold under concurrency
                    takers = await asyncio.to_thread(store.takers)
                    record = self.pool.next_for(annotator, takers)
                    if record is None:
                        raise APIError(404, "no prompts left for you in the prompt file: write one", "next")
                    dialog_id = await asyncio.to_thread(store.new_dialog, annotator, self.batch,
                                                        self.axis_of(record), record["id"], record.get("task"))
                messages = [dict(m) for m in record["messages"]]
            else:
                messages = ([{"role": "system", "content": req.system}] if req.system and req.system.strip() else [])
                messages.append({"role": "user", "content": req.prompt})
                for server in self.servers.values():  # refuse a bad dialog before storing anything
                    try:
                        server.fmt.prompt_ids(messages)
                    except ChatFormatError as e:
                        raise APIError(400, str(e), "prompt") from None
                dialog_id = await asyncio.to_thread(store.new_dialog, annotator, self.batch, self.axis_of(None))
            turn, shared = 0, record is not None and record["id"] in self.pool.shared
        if shared:  # a prompt shown to several annotators: the first generated pair is reused, A/B reshuffled
            lock = self._prompt_locks.setdefault(record["id"], asyncio.Lock())
            async with lock:
                first = await asyncio.to_thread(store.first_pair, record["id"])
                if first is None:
                    c = await self._generate(annotator, dialog_id, turn, messages, request)
                else:
                    sides = [(first["answer_a"], first["arm_a"]), (first["answer_b"], first["arm_b"])]
                    self.rng.shuffle(sides)
                    c = await asyncio.to_thread(store.add_comparison, dialog_id, turn, annotator, self.batch,
                                                messages, (sides[0][0], sides[1][0]), (sides[0][1], sides[1][1]),
                                                first["pair_id"])
        else:
            c = await self._generate(annotator, dialog_id, turn, messages, request)
        dialog = await asyncio.to_thread(store.dialog, dialog_id)
        return {"comparison_id": c["id"], "dialog_id": dialog_id, "turn": turn, "messages": messages,
                "answers": {"A": c["answer_a"], "B": c["answer_b"]}, "axis": dialog["axis"],
                "prompt_id": dialog["prompt_id"], "batch": self.batch}

    async def _generate(self, annotator: str, dialog_id: str, turn: int, messages: Dialog, request: Request) -> dict:
        arms = self.rng.sample(self.arms, 2)  # two distinct arms; the draw order is the A/B order
        answers = await asyncio.gather(*(self.answer(arm, messages, request) for arm in arms))
        return await asyncio.to_thread(self.store.add_comparison, dialog_id, turn, annotator, self.batch, messages,
                                       (answers[0], answers[1]), (arms[0].as_dict(), arms[1].as_dict()))


def create_app(tool: Tool, limits: Limits) -> Gate:
    """The FastAPI app behind `llama2.serve.Gate` (per-annotator keys, body size limit)."""
    app = FastAPI(title="llama2 annotate", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    def who(request: Request) -> str:
        return request.headers["x-annotator"]  # the Gate has checked it against the key

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/me")
    async def me(request: Request):
        name = who(request)
        left = None
        if tool.pool is not None:
            left = tool.pool.left_for(name, await asyncio.to_thread(tool.store.takers))
        return {"annotator": name, "batch": tool.batch, "axis": tool.axis, "arms": len(tool.arms),
                "prompt_file": tool.pool is not None, "prompts_left": left,
                "ratings": list(RATINGS), "safety_labels": list(LABELS)}

    @app.post("/api/comparisons")
    async def comparisons(req: CompareRequest, request: Request):
        return await tool.compare(who(request), req, request)

    @app.post("/api/judgements")
    async def judgements(req: JudgementRequest, request: Request):
        name = who(request)
        try:
            row = await asyncio.to_thread(tool.store.judge, req.comparison_id, name, req.choice, req.rating,
                                          req.safety_label)
        except StoreError as e:
            raise APIError(e.status, str(e), "comparison_id") from None
        return {"stored": True, "comparison_id": row["comparison_id"], "dialog_id": row["dialog_id"],
                "turn": row["turn"], "batch": row["batch"]}

    @app.get("/api/progress")
    async def progress():
        rows = await asyncio.to_thread(tool.store.progress)
        out = {"batch": tool.batch, "annotators": sorted(tool.annotators), "progress": rows}
        if tool.pool is not None:
            takers = await asyncio.to_thread(tool.store.takers)
            out["prompts"] = {"total": len(tool.pool.records), "shared": len(tool.pool.shared),
                              "started": sum(1 for i in tool.pool.by_id if takers.get(i))}
        return out

    @app.get("/api/agreement")
    async def agreement():
        return {"batches": await asyncio.to_thread(tool.store.agreement),
                "overlap": None if tool.pool is None else {"shared_prompts": len(tool.pool.shared),
                                                           "annotators_each": tool.pool.per_overlap}}

    return Gate(app, next(iter(tool.servers.values())), authorize=tool.authorize, routes=ROUTES)


# ----------------------------------------------------------------------------- llama2 annotate serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama2 annotate serve", description="The web annotation tool of Llama 2 "
                                "§3.2.1: annotators compare two sampled answers, rate them and label safety.")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="one or two model variants (checkpoint directories or .gguf) to sample answers from")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.1],
                   help="sampling temperatures; each comparison's answers come from two distinct (model, temperature)"
                        " arms")
    p.add_argument("--db", required=True, help="SQLite file of the annotations (created if missing)")
    p.add_argument("--batch", type=int, required=True, help="the weekly batch number stored on every judgement")
    p.add_argument("--prompts", help="prompt records (JSONL/Parquet with `messages` ending with a user turn)")
    p.add_argument("--overlap", type=float, default=0.1,
                   help="share of the prompt file shown to several annotators, for agreement (default 0.1)")
    p.add_argument("--overlap-annotators", type=int, default=2, help="annotators per shared prompt (default 2)")
    who = p.add_argument_group("annotators (at least one)")
    who.add_argument("--annotators", metavar="FILE", help="one `name:key` a line (keeps keys out of `ps`)")
    who.add_argument("--annotator", action="append", default=[], metavar="NAME:KEY", help="repeatable")
    p.add_argument("--axis", choices=("auto",) + AXES, default="auto",
                   help="auto: safety for prompt-file records with is_safety, helpfulness otherwise")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the arm draws and A/B order (default: random)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded together per model")
    p.add_argument("--format", choices=["auto", "llama2", "template"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def cli(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    import uvicorn

    logging.basicConfig(level=a.log_level.upper(), format="[llama2 annotate] %(levelname)s %(message)s")
    if a.batch < 0:
        raise ValueError("--batch must be >= 0")
    if a.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if len(set(a.models)) != len(a.models):
        raise ValueError("--models: the same model is given twice (use two temperatures for one model)")
    annotators = load_annotators(a.annotators, a.annotator)
    pool = PromptPool(load_prompts(a.prompts), a.overlap, a.overlap_annotators, a.seed or 0) if a.prompts else None
    store = AnnotationStore(a.db)
    limits = Limits(max_concurrent=1 << 16, max_tokens=a.max_new_tokens, max_request_bytes=1 << 16)
    servers: dict[str, Server] = {}
    for path in a.models:
        model, tok = load_for_inference(path, a.device, a.dtype)
        servers[path] = Server(model, tok, ChatFormat(tok, a.format), path, limits, max_batch=a.max_batch)
    tool = Tool(servers, a.temperatures, store, annotators, a.batch, pool, a.axis, a.top_p, a.seed)
    for server in servers.values():
        server.engine.start()
    print(f"[llama2 annotate] {len(tool.arms)} arms ({', '.join(json.dumps(x.as_dict()) for x in tool.arms)}), "
          f"{len(annotators)} annotators, batch {a.batch}, db {a.db}: http://{a.host}:{a.port}/",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(tool, limits), host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    finally:
        for server in servers.values():
            server.engine.stop()
        store.close()
    return 0
