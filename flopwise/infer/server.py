"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the CPU engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true``
answers with server-sent events and a final ``data: [DONE]``). One worker thread owns the engine
(and its KV cache): a request that finds it idle starts at once, alone; requests that arrive while
it is busy wait, and its next step decodes every waiting request that can share a batch as one
(``Batcher``: on a CPU a batch of rows reads each weight once, so it costs little more than one
row). At most ``max_queue`` requests wait; more get 503. Bad requests get OpenAI-style 400
errors and never take the server down.
"""

import asyncio
import collections
import contextlib
import dataclasses
import json
import signal
import threading
import time
import uuid
from typing import Literal, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from flopwise.data.instructions import STOP_STRINGS, chat_prompt_ids
from flopwise.errors import FlopwiseError
from flopwise.infer.generate import Engine, Sampling, batchable

Number = Union[StrictInt, StrictFloat]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored; known ones are type-checked
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)  # extension (as llama.cpp's server and vLLM)
    repetition_penalty: Number = Field(1.0, gt=0)  # extension
    n: StrictInt = Field(1, ge=1, le=8)
    stream: StrictBool = False
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr]]
    max_tokens: Optional[StrictInt] = Field(16, ge=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class _Busy(Exception):
    pass


def error(status: int, message: str, param: str | None = None, etype: str = "invalid_request_error",
          code: str | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": etype, "param": param,
                                                               "code": code}})


def sampling(req: _Common, prompt_len: int, ctx: int) -> Sampling:
    """A request's sampling options; max_tokens past the context is refused as OpenAI words it."""
    max_tokens = req.max_tokens if req.max_tokens is not None else ctx - prompt_len
    if prompt_len + max_tokens > ctx:
        raise FlopwiseError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                            "completion). Please reduce the prompt or max_tokens.")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Sampling(max_new_tokens=max_tokens, temperature=float(req.temperature), top_k=req.top_k,
                    top_p=float(req.top_p), repetition_penalty=float(req.repetition_penalty), seed=req.seed,
                    stop=stop)


def usage(results: list[tuple[str, dict]], prompts: list[list[int]]) -> dict:
    p = sum(len(ids) for ids in prompts)  # each prompt once, whatever n
    c = sum(info["completion_tokens"] for _, info in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@dataclasses.dataclass(eq=False)
class Job:
    """One completion for the worker: its prompt ids and sampling, and what to call as text arrives
    (``on_piece``), when it ends (``on_end(info)``) or fails (``on_error(message)``): called on the worker."""

    ids: list[int]
    sampling: Sampling
    on_piece: object
    on_end: object
    on_error: object
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)  # its client left


class Batcher:
    """The one thread that decodes: each step takes the oldest waiting job and every other waiting job it
    can batch with (``batchable``: the same sampling rule and no seed; the context big enough for the longest
    prompt plus the largest budget), at most ``max_batch`` rows."""

    def __init__(self, engine: Engine, max_batch: int = 16, thread: bool = True):
        self.engine, self.max_batch = engine, max_batch
        self.jobs: collections.deque[Job] = collections.deque()
        self.current: list[Job] = []
        self.ready = threading.Condition()
        if thread:
            threading.Thread(target=self.work, daemon=True, name="flopwise-decode").start()

    def submit(self, job: Job) -> None:
        with self.ready:
            self.jobs.append(job)
            self.ready.notify()

    def _take(self, stop) -> list[Job]:
        with self.ready:
            while True:
                while self.jobs and self.jobs[0].cancelled.is_set():
                    self.jobs.popleft()  # its client left before it started
                if self.jobs:
                    break
                if stop():
                    return []
                self.ready.wait(0.5)
            batch = [self.jobs.popleft()]
            ctx = self.engine.config.seq_len
            for job in list(self.jobs):
                if len(batch) == self.max_batch:
                    break
                rows = batch + [job]
                if job.cancelled.is_set():
                    self.jobs.remove(job)
                elif batchable(batch[0].sampling, job.sampling) and \
                        max(len(j.ids) for j in rows) + max(j.sampling.max_new_tokens for j in rows) <= ctx:
                    self.jobs.remove(job)
                    batch.append(job)
            return batch

    def work(self, stop=lambda: False) -> None:
        """Decode jobs until ``stop()``. Best on the thread that built the engine: decoding on another thread
        ran 1.6x slower here (a second OpenMP thread pool beside the first one's)."""
        while True:
            batch = self._take(stop)
            if not batch:
                return
            self.current, ended = batch, set()
            try:
                for row, piece, info in self.engine.stream_texts([j.ids for j in batch], [j.sampling for j in batch]):
                    if piece:
                        batch[row].on_piece(piece)
                    if info is not None:
                        ended.add(row)
                        batch[row].on_end(info)
                    if all(r in ended or j.cancelled.is_set() for r, j in enumerate(batch)):
                        break  # every client still there has its answer: stop decoding
            except Exception as e:  # reported to each request still waiting; the worker goes on
                for row, job in enumerate(batch):
                    if row not in ended:
                        job.on_error(f"{type(e).__name__}: {e}")
            self.current = []

    def fail_all(self, message: str) -> None:
        """Answer every waiting and running job with an error (the server is stopping)."""
        with self.ready:
            jobs, self.jobs = list(self.jobs) + self.current, collections.deque()
        for job in jobs:
            job.on_error(message)


def create_app(engine: Engine, model_name: str, max_queue: int = 32, batcher: Batcher | None = None) -> FastAPI:
    """The app; its jobs go to ``batcher`` (default: one decoding on a thread of its own)."""
    app = FastAPI(title="flopwise", version="1")
    batcher = batcher or Batcher(engine)
    waiting = {"n": 0}
    ctx = engine.config.seq_len

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {}
        loc = [str(x) for x in e.get("loc", []) if x != "body"]
        if e.get("type") == "json_invalid":
            return error(400, "We could not parse the JSON body of your request: send valid JSON.")
        # a union's error names the member type ('temperature.int'): report the field itself
        field = ".".join(x for x in loc if x not in ("int", "float", "str", "bool", "list[str]")) or "body"
        return error(400, f"{field}: {e.get('msg', 'invalid value')} (got {e.get('input')!r})", field)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # the server stays up whatever a request does
        return error(500, f"internal error: {type(exc).__name__}: {exc}", etype="server_error")

    @contextlib.contextmanager
    def queue_slot():
        """A place among the ``max_queue`` requests waiting for (or being decoded by) the worker; _Busy when
        full."""
        if waiting["n"] >= max_queue:
            raise _Busy()
        waiting["n"] += 1
        try:
            yield
        finally:
            waiting["n"] -= 1

    def submit(ids: list[int], s: Sampling, put) -> Job:
        """A job whose events (piece, end, error) reach ``put`` on the event loop's thread."""
        loop = asyncio.get_running_loop()

        def post(kind):
            def send(value):
                if not loop.is_closed():
                    loop.call_soon_threadsafe(put, (kind, value))
            return send
        job = Job(ids, s, post("piece"), post("end"), post("error"))
        batcher.submit(job)
        return job

    async def complete_all(prompts: list[list[int]], samplings: list[Sampling], n: int) -> list[tuple[str, dict]]:
        """Every prompt n times (choice k seeded with seed + k), all submitted at once: they may share batches."""
        queues = []
        for ids, s in zip(prompts, samplings, strict=True):
            for k in range(n):
                queue: asyncio.Queue = asyncio.Queue()
                submit(ids, dataclasses.replace(s, seed=None if s.seed is None else s.seed + k), queue.put_nowait)
                queues.append(queue)
        out = []
        for queue in queues:
            pieces = []
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    pieces.append(value)
                elif kind == "end":
                    out.append(("".join(pieces), value))
                    break
                else:
                    raise RuntimeError(value)
        return out

    async def serialized(prompts, samplings, n):
        with queue_slot():
            return await complete_all(prompts, samplings, n)

    def streaming(ids: list[int], s: Sampling, chunk) -> StreamingResponse:
        async def events():
            try:
                slot = queue_slot()
                slot.__enter__()
            except _Busy:
                yield "data: " + json.dumps({"error": {"message": "server busy", "type": "server_error"}}) + "\n\n"
                return
            queue: asyncio.Queue = asyncio.Queue()
            job = submit(ids, s, queue.put_nowait)
            try:
                yield "data: " + json.dumps(chunk(None, None, first=True)) + "\n\n"
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        yield "data: " + json.dumps(chunk(value, None)) + "\n\n"
                    elif kind == "end":
                        yield "data: " + json.dumps(chunk(None, value["finish_reason"])) + "\n\n"
                        break
                    else:  # reported in-stream: the headers are already sent
                        yield "data: " + json.dumps({"error": {"message": value, "type": "server_error"}}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a client that left early: its job is dropped or stops being decoded
                slot.__exit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "flopwise"}]}

    def unknown_model(req: _Common) -> JSONResponse | None:
        """OpenAI's 404 for a model this server does not serve (no model given: this one)."""
        if req.model is None or req.model == model_name:
            return None
        return error(404, f"The model '{req.model}' does not exist: this server serves '{model_name}'", "model",
                     code="model_not_found")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if (e := unknown_model(req)) is not None:
            return e
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not p for p in prompts):
            return error(400, "prompt must be a non-empty string (or a list of them)", "prompt")
        try:
            ids = [engine.encode_prompt(p) for p in prompts]
            samplings = [sampling(req, len(i), ctx) for i in ids]
            for s in samplings:
                s.check()
        except FlopwiseError as e:
            return error(400, str(e), "max_tokens" if "context" in str(e) else None)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if len(ids) > 1 or req.n > 1:
                return error(400, "stream with several prompts or n > 1 is not supported", "stream")

            def chunk(text, finish, first=False):
                if first:
                    return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                            "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": None}]}
                return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                        "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}
            return streaming(ids[0], samplings[0], chunk)
        try:
            results = await serialized(ids, samplings, req.n)
        except _Busy:
            return error(503, "the server is busy: retry shortly", etype="server_error")
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": info["finish_reason"]}
                            for i, (t, info) in enumerate(results)], "usage": usage(results, ids)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if (e := unknown_model(req)) is not None:
            return e
        messages = [m.model_dump() for m in req.messages]
        if not any(m["content"].strip() for m in messages if m["role"] == "user"):
            return error(400, "the user message is empty", "messages")
        try:
            ids = chat_prompt_ids(engine.sp, messages)
            s = sampling(req, len(ids), ctx)
            s.stop = s.stop + list(STOP_STRINGS)
            s.check()
        except FlopwiseError as e:
            return error(400, str(e), "max_tokens" if "context" in str(e) else "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if req.n > 1:
                return error(400, "stream with n > 1 is not supported", "n")

            def chunk(text, finish, first=False):
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return streaming(ids, s, chunk)
        try:
            results = await serialized([ids], [s], req.n)
        except _Busy:
            return error(503, "the server is busy: retry shortly", etype="server_error")
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t.strip()},
                             "finish_reason": info["finish_reason"]} for i, (t, info) in enumerate(results)],
                "usage": usage(results, [ids])}

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 32,
          log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM: HTTP on a thread, decoding on this one (the thread that built the engine).
    On the way out every waiting or running request is answered with an error, then the server closes."""
    batcher = Batcher(engine, thread=False)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name, max_queue, batcher), host=host, port=port,
                                           log_level=log_level, timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, daemon=True, name="flopwise-http")

    def stop(signum, frame):  # uvicorn installs no handlers off the main thread: SIGTERM ends us as Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    http.start()
    try:
        batcher.work(stop=lambda: not http.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        batcher.fail_all("the server is shutting down")
        server.should_exit = True
        http.join(10)
    if not server.started:
        raise FlopwiseError(f"could not serve on {host}:{port} (see the message above): choose another --port")
