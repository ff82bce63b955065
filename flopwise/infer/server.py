"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the CPU engine.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true``
answers with server-sent events and a final ``data: [DONE]``). Requests are served one at a
time by one worker thread (the engine owns one KV cache), with at most ``max_queue`` waiting;
more get 503. Bad requests get OpenAI-style 400 errors and never take the server down.
"""

import asyncio
import contextlib
import dataclasses
import json
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
from flopwise.infer.generate import Engine, Sampling

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


def create_app(engine: Engine, model_name: str, max_queue: int = 32) -> FastAPI:
    app = FastAPI(title="flopwise", version="1")
    lock = threading.Lock()  # one generation at a time: the engine owns a single KV cache
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

    def run_locked(fn):
        with lock:
            return fn()

    @contextlib.contextmanager
    def queue_slot():
        """A place among the ``max_queue`` requests waiting for (or holding) the engine; _Busy when full."""
        if waiting["n"] >= max_queue:
            raise _Busy()
        waiting["n"] += 1
        try:
            yield
        finally:
            waiting["n"] -= 1

    async def serialized(fn):
        with queue_slot():
            return await asyncio.to_thread(run_locked, fn)

    def complete_all(prompts: list[list[int]], samplings: list[Sampling], n: int) -> list[tuple[str, dict]]:
        out = []
        for ids, s in zip(prompts, samplings, strict=True):
            for k in range(n):
                s_k = dataclasses.replace(s, seed=None if s.seed is None else s.seed + k)
                info: dict = {}
                text = "".join(engine.stream_text(ids, s_k, info))
                out.append((text, info))
        return out

    def streaming(ids: list[int], s: Sampling, chunk) -> StreamingResponse:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def produce():
            info: dict = {}
            try:
                for piece in engine.stream_text(ids, s, info):
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", info["finish_reason"]))
            except Exception as e:  # reported in-stream: the headers are already sent
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e)))

        async def events():
            try:
                slot = queue_slot()
                slot.__enter__()
            except _Busy:
                yield "data: " + json.dumps({"error": {"message": "server busy", "type": "server_error"}}) + "\n\n"
                return
            task = asyncio.create_task(asyncio.to_thread(run_locked, produce))
            try:
                yield "data: " + json.dumps(chunk(None, None, first=True)) + "\n\n"
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        yield "data: " + json.dumps(chunk(value, None)) + "\n\n"
                    elif kind == "end":
                        yield "data: " + json.dumps(chunk(None, value)) + "\n\n"
                        break
                    else:
                        yield "data: " + json.dumps({"error": {"message": value, "type": "server_error"}}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                await task
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
            results = await serialized(lambda: complete_all(ids, samplings, req.n))
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
            results = await serialized(lambda: complete_all([ids], [s], req.n))
        except _Busy:
            return error(503, "the server is busy: retry shortly", etype="server_error")
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t.strip()},
                             "finish_reason": info["finish_reason"]} for i, (t, info) in enumerate(results)],
                "usage": usage(results, [ids])}

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 32,
          log_level: str = "info") -> None:
    uvicorn.run(create_app(engine, model_name, max_queue), host=host, port=port, log_level=log_level)
