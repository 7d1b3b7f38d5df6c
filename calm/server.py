"""An OpenAI-compatible HTTP server for CALM and the baseline (``calm serve``).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (``prompt`` a
string or a list, ``max_tokens``, ``temperature`` in (0, 1], ``n``, ``stop``,
``seed``, ``stream`` as server-sent events), answered in the OpenAI format; the
official ``openai`` client works against it. CALM-specific request fields:
``sampler`` ('auto', 'batch', 'exact'), ``num_candidates`` (the batch sampler's N)
and ``max_calls`` (the exact sampler's cap on draws per step); like vLLM's,
``ignore_eos`` runs to ``max_tokens`` through end-of-text (for benchmarks). Every
response names the sampler it used under ``"calm"``.

Bad requests get a 400 with an OpenAI-style error body; a full queue a 503. The
batching itself is ``calm.serving.Engine``. Needs the ``serve`` extra (FastAPI,
uvicorn).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Literal

from calm.errors import CalmError
from calm.serving import Engine, Job, QueueFull, row_sampler

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as e:  # pragma: no cover - depends on the environment
    raise CalmError(
        "calm serve needs the serve extra: pip install 'calm-lm[serve]' (FastAPI and uvicorn)"
    ) from e

MAX_STOP = 4  # stop sequences per request, as OpenAI's API allows


class CompletionRequest(BaseModel):
    """The fields of ``POST /v1/completions`` this server knows; any other is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = 1.0
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None
    ignore_eos: bool = False  # as vLLM's: generate max_tokens whatever comes (benchmarks)
    # CALM's likelihood-free temperature sampling
    sampler: Literal["auto", "batch", "exact"] = "auto"
    num_candidates: int | None = Field(None, ge=1)
    max_calls: int | None = Field(None, ge=1)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_response(message: str, *, status: int = 400, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _parse(raw: bytes) -> CompletionRequest:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise BadRequest(f"unknown field {where!r}", where) from None
        raise BadRequest(f"{where}: {err['msg']}", where.split(".")[0] or None) from None


def create_app(lm, *, model_id: str, max_batch: int = 16, wait_ms: float = 10.0,
               max_queue: int = 64, num_candidates: int = 200, max_calls: int = 100_000,
               precision: str = "fp32") -> FastAPI:
    """The ASGI app serving ``lm`` (a ``calm.LanguageModel``) under the name ``model_id``.

    ``num_candidates`` / ``max_calls``: the server's defaults for CALM's batch and
    exact samplers (a request may set its own).
    """
    from contextlib import asynccontextmanager

    engine = Engine(lm.model, lm.tokenizer, precision=precision, max_batch=max_batch,
                    wait_ms=wait_ms, max_queue=max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="calm", lifespan=lifespan)
    app.state.engine = engine

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "kind": lm.kind}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "calm",
             "kind": lm.kind, "context_tokens": engine.context_tokens}]}

    def build_job(req: CompletionRequest, emit) -> tuple[Job, list[int], dict]:
        if req.model is not None and req.model != model_id:
            raise BadRequest(f"the model {req.model!r} is not served here; this server serves "
                             f"{model_id!r}", "model", status=404, kind="model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise BadRequest("prompt: give at least one prompt", "prompt")
        if any(not p.strip() for p in prompts):
            raise BadRequest("prompt: an empty prompt has nothing to continue", "prompt")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise BadRequest(f"stop: give up to {MAX_STOP} non-empty strings", "stop")
        if not 0 < req.temperature <= 1:
            raise BadRequest(f"temperature must be in (0, 1], got {req.temperature}",
                             "temperature")
        if lm.kind != "calm" and (req.sampler != "auto" or req.num_candidates or req.max_calls):
            raise BadRequest("sampler, num_candidates and max_calls apply to CALM only",
                             "sampler")
        try:
            sampler = row_sampler(
                lm.model, req.temperature, sampler=req.sampler,
                num_candidates=req.num_candidates or num_candidates,
                max_calls=req.max_calls or max_calls,
            )
        except CalmError as e:
            raise BadRequest(str(e), "temperature") from None
        from calm.loading import document_start_id

        start = document_start_id(lm.config, lm.tokenizer)
        encoded = [lm.encode(p) for p in prompts]
        for p in encoded:
            try:
                engine.check(len(p) + 1, req.max_tokens)
            except CalmError as e:
                raise BadRequest(str(e), "max_tokens") from None
        rows = [[start] + p for p in encoded for _ in range(req.n)]
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        job = Job(rows, req.max_tokens, sampler, seed, emit, stop, ignore_eos=req.ignore_eos)
        info = {"sampler": sampler.name, "seed": seed}
        if sampler.num_candidates is not None:
            info["num_candidates"] = sampler.num_candidates
        return job, [len(p) for p in encoded], info

    @app.post("/v1/completions")
    async def completions(request: Request):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            req = _parse(await request.body())
            job, prompt_lens, info = build_job(req, emit)
            engine.submit(job)
        except BadRequest as e:
            return error_response(e.message, status=e.status, param=e.param, kind=e.kind)
        except QueueFull:
            return error_response("the server is busy: its queue is full; retry later",
                                  status=503, kind="server_busy")
        except CalmError as e:
            return error_response(str(e))
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        n_prompt = sum(prompt_lens) * req.n

        def usage(finished: dict) -> dict:
            done = sum(t for _, t in finished.values())
            return {"prompt_tokens": n_prompt, "completion_tokens": done,
                    "total_tokens": n_prompt + done}

        if req.stream:
            async def sse():
                finished: dict[int, tuple[str, int]] = {}
                try:
                    while True:
                        ev = await events.get()
                        if ev[0] == "text":
                            chunk = {**head, "choices": [{"text": ev[2], "index": ev[1],
                                                          "logprobs": None, "finish_reason": None}]}
                        elif ev[0] == "finish":
                            finished[ev[1]] = (ev[2], ev[3])
                            chunk = {**head, "choices": [{"text": "", "index": ev[1],
                                                          "logprobs": None, "finish_reason": ev[2]}]}
                        elif ev[0] == "error":
                            err = {"message": ev[1], "type": "invalid_request_error",
                                   "param": None, "code": None}
                            yield f"data: {json.dumps({'error': err})}\n\n"
                            break
                        else:  # done
                            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(finished), 'calm': info})}\n\n"
                            break
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancelled.set()  # a client gone mid-stream: its rows are dropped

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        texts: dict[int, list[str]] = {}
        finished: dict[int, tuple[str, int]] = {}
        try:
            while True:
                ev = await events.get()
                if ev[0] == "text":
                    texts.setdefault(ev[1], []).append(ev[2])
                elif ev[0] == "finish":
                    finished[ev[1]] = (ev[2], ev[3])
                elif ev[0] == "error":
                    return error_response(ev[1])
                else:
                    break
        finally:
            job.cancelled.set()
        choices = [{"text": "".join(texts.get(i, [])), "index": i, "logprobs": None,
                    "finish_reason": finished.get(i, ("length", 0))[0]} for i in range(job.rows)]
        return {**head, "choices": choices, "usage": usage(finished), "calm": info}

    return app


class Served:
    """A server running in a thread of this process (tests, benchmarks): ``url``, ``close()``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket
        import threading

        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise CalmError("the server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
