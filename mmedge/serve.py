"""`mmedge serve`: the OpenAI chat-completions API over packages, on FastAPI (Starlette) and uvicorn.

    mmedge serve mmedge/models/shapes-paligemma.pkg --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "shapes-paligemma", "messages": [...]}'

Each package is served by one Pipeline and one worker thread: requests for it run one at a time, in the order
they came, and wait in a bounded queue meanwhile (--max-queue; a request that finds it full is answered 429 at
once). One at a time is what keeps the Pipeline's caches useful: a client that sends its conversation again with
one more question finds the earlier turns in the KV cache (`usage.prompt_tokens_details.cached_tokens` says how
many tokens were not computed again), and an image sent again skips the vision encoder. Several packages are
served at once by name (`name=path`, or the directory's name), each with its own worker.

Every error is an HTTP status with an OpenAI-style JSON body, {"error": {"message", "type", "code"}}, and one
line in the log; the server keeps serving. It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request as HttpRequest  # the serve extra: pip install 'mmedge[serve]'
from fastapi.responses import JSONResponse, StreamingResponse

from mmedge.errors import InputError, MmedgeError, first_line

log = logging.getLogger("mmedge.serve")

MAX_IMAGES = 8  # images one request may carry; the body limit is sized for this many at --max-image-mb
ROLES = ("system", "user", "assistant")
# request fields this server reads; others that OpenAI defines and that change nothing here are accepted and
# ignored (user, logprobs=false, ...); those that would change the answer and are not supported are refused
SUPPORTED = {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
             "stop", "n", "stream_options", "user", "logprobs", "presence_penalty", "frequency_penalty"}


MAX_MESSAGE = 400  # characters of an error message


class ServeError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        # a client's own values echoed back stay short, and JSON-encodable (a path or text with unpaired
        # surrogates was a 500: the body could not be written)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 5] + " ... "
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code}}


@dataclass
class ServeConfig:
    max_queue: int = 16  # requests waiting per package (beyond the one running)
    max_image_mb: float = 20.0  # the most one image may weigh, encoded
    timeout: float = 300.0  # seconds a request may take, waiting and generating together
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/ when set
    allow_local_files: bool = False  # image_url may name a file on the server's disk

    @property
    def max_body_bytes(self) -> int:
        """Base64 of MAX_IMAGES images at the limit, and a megabyte for the text."""
        return int(self.max_image_mb * (1 << 20) * 4 / 3 * MAX_IMAGES) + (1 << 20)


@dataclass
class Request:
    """A chat-completions request, checked."""

    model: str
    system: str | None
    turns: list[tuple[str, str, list[bytes | str]]]  # (role, text, images) of every message after the system's
    options: dict[str, Any]
    stream: bool
    include_usage: bool


@dataclass
class Result:
    """What a finished generation reports, for the response's last chunk."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Served:
    """One package: its Pipeline and the single worker thread that runs its requests in arrival order."""

    name: str
    pipe: Any
    created: int = field(default_factory=lambda: int(time.time()))
    waiting: int = 0  # admitted, not finished
    lock: threading.Lock = field(default_factory=threading.Lock)
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mmedge"))

    def admit(self, max_queue: int) -> None:
        with self.lock:
            if self.waiting > max_queue:
                raise ServeError(429, f"{self.name} has {self.waiting - 1} requests waiting (--max-queue {max_queue}):"
                                 " retry later", "rate_limit_error", "queue_full")
            self.waiting += 1

    def done(self) -> None:
        with self.lock:
            self.waiting -= 1

    def describe(self) -> dict:
        m = self.pipe.manifest
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "mmedge",
                "family": m.model_type, "target": m.target,
                "precision": (m.quantization or {}).get("name", "fp32"),
                "context": self.pipe.cache.capacity, "chat": self.pipe.codec.chat is not None}


# -- parsing ---------------------------------------------------------------------------------------------------

def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ServeError(400, f"{name} must be {'a number' if kind is float else 'a whole number'}, got {value!r}",
                         code="invalid_value")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ServeError(400, f"{name} must be {bounds}, got {value!r}", code="invalid_value")
    return value


def _content(message: dict, index: int, role: str) -> tuple[str, list[str]]:
    """A message's text (its text parts joined) and its image URLs."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ServeError(400, f"messages[{index}].content must be text or a list of parts")
    texts, urls = [], []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ServeError(400, f"{where}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}")
            if role != "user":
                raise ServeError(400, f"{where}: images go in user messages, not {role} ones")
            urls.append(url)
        else:
            raise ServeError(400, f"{where} must be {{\"type\": \"text\", \"text\": ...}} or "
                             "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}")
    return "".join(texts), urls


def parse_request(raw: bytes) -> Request:
    """The request body, checked field by field; the first thing wrong is a 400 that says what and where."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4,300+ digit numbers, nesting
        raise ServeError(400, f"the request body is not valid JSON: {first_line(exc)}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServeError(400, "model is required: the name of a served package (GET /v1/models lists them)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "messages must be a non-empty list of {role, content}")
    system, turns = None, []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ServeError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        text, urls = _content(message, i, role)
        if role == "system":
            if i != 0:
                raise ServeError(400, f"messages[{i}]: a system message goes first, once")
            system = text
        else:
            turns.append((role, text, urls))
    if not turns or turns[-1][0] != "user":
        raise ServeError(400, "the last message must be the user's: the question to answer")
    if sum(len(t[2]) for t in turns) > MAX_IMAGES:
        raise ServeError(400, f"at most {MAX_IMAGES} images a request")
    unsupported = sorted(k for k in body if k not in SUPPORTED)
    if unsupported:
        raise ServeError(400, f"unsupported field(s) {', '.join(unsupported)}", code="unsupported_parameter")
    if _number(body, "n", int, 1) not in (None, 1):
        raise ServeError(400, "n must be 1: one choice a request", code="invalid_value")
    if body.get("logprobs"):
        raise ServeError(400, "logprobs are not supported", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, float, -2, 2):
            raise ServeError(400, f"{name} is not supported (only 0)", code="unsupported_parameter")
    options: dict[str, Any] = {}
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    max_tokens = max_tokens if max_tokens is not None else _number(body, "max_tokens", int, 1)
    if max_tokens is not None:
        options["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1)
    if temperature:  # absent or 0: greedy, the answer the package was checked to give
        options.update(do_sample=True, temperature=float(temperature))
        if top_p:
            options["top_p"] = float(top_p)
    seed = _number(body, "seed", int, 0)
    if seed is not None:
        options["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ServeError(400, "stop must be a string or a list of up to 4 non-empty strings")
        options["stop"] = stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(400, f"stream must be true or false, got {stream!r}")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ServeError(400, "stream_options must be an object")
    return Request(model, system, turns, options, stream, bool(stream_options.get("include_usage")))


_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.S | re.I)  # a URI's scheme, and base64's token, in any case (RFC 3986, 2397)


def decode_image(url: str, config: ServeConfig) -> bytes | str:
    """An image_url's bytes (a data URI) or, with --allow-local-files, its path; the size checked."""
    limit = int(config.max_image_mb * (1 << 20))
    m = _DATA_URI.match(url)
    if m:
        if not m.group("b64"):
            raise ServeError(400, "an image data URI must be base64 (data:image/png;base64,...)")
        data = url[m.end():]
        if len(data) * 3 // 4 > limit + 3:
            raise ServeError(413, f"an image is over --max-image-mb {config.max_image_mb:g}", code="image_too_large")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(400, "an image data URI is not valid base64", code="invalid_image") from None
    if url.startswith(("http://", "https://")):
        raise ServeError(400, "this server does not fetch URLs: send the image as a data URI "
                         "(data:image/jpeg;base64,...)", code="invalid_image")
    if not config.allow_local_files:
        raise ServeError(400, "image_url must be a data URI (data:image/jpeg;base64,...); local file paths are off "
                         "(the server's --allow-local-files turns them on)", code="invalid_image")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if path.exists() and not path.is_file():  # a folder, a device, a FIFO (whose read would never end)
        raise ServeError(400, f"{path} is not an image file", code="invalid_image")
    if path.is_file() and path.stat().st_size > limit:
        raise ServeError(413, f"{path} is over --max-image-mb {config.max_image_mb:g}", code="image_too_large")
    return str(path)


# -- running -----------------------------------------------------------------------------------------------------

def prepare(served: Served, request: Request, config: ServeConfig) -> list:
    """What is wrong with a request short of running the model, found before it queues (behind a full queue it was
    a 429, behind slow ones a 504, not what was wrong): max_tokens against the context, a conversation sent to a
    fixed-format model, each image decoded. Returns the turns with their images' bytes (or paths)."""
    pipe = served.pipe
    max_new = pipe.options(**request.options).max_new_tokens  # checked before any image is decoded
    if max_new > pipe.cache.capacity:
        raise ServeError(400, f"max_tokens {max_new} is more than {served.name}'s context holds "
                         f"({pipe.cache.capacity} tokens, prompt included)", code="context_length_exceeded")
    if pipe.codec.chat is None and (len(request.turns) > 1 or request.system is not None):
        raise ServeError(400, f"{served.name} takes one question in a fixed format ({pipe.manifest.model_type}"
                         " has no chat template): send a single user message")
    return [(role, text, [decode_image(u, config) for u in urls]) for role, text, urls in request.turns]


def pieces(served: Served, request: Request, turns: list, result: Result) -> Iterator[str]:
    """The answer's text in pieces, from the worker thread (`turns`: prepare()'s); `result` filled in when it
    ends."""
    pipe = served.pipe
    options = request.options
    max_new = pipe.options(**options).max_new_tokens
    *history, (_, question, images) = turns
    if pipe.codec.chat is not None:
        chat = pipe.chat(system=request.system)
        chat.overflow_advice = "send fewer or shorter messages, or fewer images"
        for role, text, turn_images in history:
            chat.add(role, text, turn_images, **options)
        stream = chat.stream(images or None, question, **options)
    else:
        stream = pipe.stream(images[0] if len(images) == 1 else (images or None), question, **options)
    yield from stream
    t = pipe.timings
    result.prompt_tokens, result.completion_tokens, result.cached_tokens = (
        t.prompt_tokens, t.new_tokens, t.reused_tokens)
    # cut by max_tokens, or by the context (generation stops where the cache is full)
    full = t.prompt_tokens + t.new_tokens >= pipe.cache.capacity
    result.finish_reason = "length" if t.new_tokens >= max_new or full else "stop"


_END = object()


class Job:
    """One request on its package's worker thread; the event loop reads its pieces from an asyncio queue."""

    def __init__(self, served: Served, request: Request, config: ServeConfig, loop: asyncio.AbstractEventLoop,
                 turns: list):
        self.served, self.request, self.config, self.loop, self.turns = served, request, config, loop, turns
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.deadline = time.monotonic() + config.timeout
        self.result = Result()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def run(self) -> None:  # on the worker thread
        try:
            if self.cancelled.is_set():
                self._put(_END)  # the handler, if still waiting, ends instead of waiting out the deadline
                return
            if time.monotonic() > self.deadline:
                raise ServeError(504, f"the request waited in the queue longer than --timeout {self.config.timeout:g}"
                                 " s", "timeout_error", "timeout")
            gen = pieces(self.served, self.request, self.turns, self.result)
            try:
                for piece in gen:
                    self._put(piece)
                    if self.cancelled.is_set():
                        self._put(_END)
                        return
                    if time.monotonic() > self.deadline:
                        raise ServeError(504, f"the answer took longer than --timeout {self.config.timeout:g} s: ask "
                                         "for fewer max_tokens", "timeout_error", "timeout")
            finally:
                gen.close()
            self._put(_END)
        except ServeError as exc:
            self._put(exc)
        except MmedgeError as exc:
            self._put(ServeError(400, exc.message))
        except Exception as exc:  # a bug: one line here, a 500 there
            log.error("%s: internal error: %s: %s (MMEDGE_DEBUG=1 shows the traceback)", self.served.name,
                      type(exc).__name__, first_line(exc), exc_info=bool(os.environ.get("MMEDGE_DEBUG")))
            self._put(ServeError(500, f"internal error: {type(exc).__name__}", "server_error", "internal_error"))
        finally:
            self.served.done()

    async def items(self):
        """The pieces as the worker makes them; a request still waiting for its turn (or for its next piece) at
        its deadline is answered 504 from here, and the worker skips it."""
        while True:
            try:  # a second's grace: the worker's own check, with the better message, usually comes first
                item = await asyncio.wait_for(self.queue.get(), max(0.0, self.deadline - time.monotonic()) + 1.0)
            except asyncio.TimeoutError:
                self.cancelled.set()
                raise ServeError(504, f"no answer within --timeout {self.config.timeout:g} s (the model is busy or "
                                 "slow): retry later, or ask for fewer max_tokens", "timeout_error", "timeout") from None
            if item is _END:
                return
            if isinstance(item, ServeError):
                raise item
            yield item


async def _cancel_when_gone(http, job: Job) -> None:
    """Cancels `job` once the client disconnects: its next ASGI message after the body is the disconnect
    (Request.is_disconnected() never saw it through the middleware: it polls with a cancelled scope)."""
    while not job.cancelled.is_set():
        if (await http.receive())["type"] == "http.disconnect":
            job.cancelled.set()
            return


def _chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None, usage: dict | None = None):
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
        out["choices"] = []
    return f"data: {json.dumps(out)}\n\n"


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}


def create_app(models: dict[str, Any], config: ServeConfig | None = None):
    """The ASGI app over `models` (name -> Pipeline)."""
    config = config or ServeConfig()
    served = {name: Served(name, pipe) for name, pipe in models.items()}
    ids = itertools.count()
    app = FastAPI(title="mmedge", docs_url=None, redoc_url=None, openapi_url=None)

    def error(exc: ServeError, headers: dict | None = None) -> JSONResponse:
        log.info("%d %s", exc.status, exc.message)
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(_, exc: ServeError):
        return error(exc)

    @app.exception_handler(404)
    async def _not_found(http: HttpRequest, _):
        return error(ServeError(404, f"no route {http.method} {http.url.path}: POST /v1/chat/completions, "
                                "GET /v1/models, GET /health", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(http: HttpRequest, exc):
        allow = (getattr(exc, "headers", None) or {}).get("Allow")  # the methods the route takes (RFC 9110)
        return error(ServeError(405, f"{http.method} is not allowed on {http.url.path}"
                                + (f": {allow}" if allow else ""), code="method_not_allowed"),
                     {"Allow": allow} if allow else None)

    @app.middleware("http")
    async def _guard(http: HttpRequest, call_next: Callable):
        """The API key, then the body's size: both before a byte of the body is read."""
        if config.api_key and http.url.path.startswith("/v1/"):
            given = http.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
                return error(ServeError(401, "a valid API key is required: Authorization: Bearer KEY",
                                        "authentication_error", "invalid_api_key"))
        length = http.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return error(ServeError(413, f"the request body is over {config.max_body_bytes >> 20} MB "
                                    f"({MAX_IMAGES} images at --max-image-mb {config.max_image_mb:g})",
                                    code="body_too_large"))
        return await call_next(http)

    async def read_body(http: HttpRequest) -> bytes:
        chunks, size = [], 0
        async for chunk in http.stream():  # a chunked body has no content-length: counted as it comes
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ServeError(413, f"the request body is over {config.max_body_bytes >> 20} MB", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():  # the process id tells replicas apart behind a load balancer (Ray Serve)
        return {"status": "ok", "process": os.getpid(), "models": {n: {"waiting": s.waiting} for n, s in served.items()}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [s.describe() for s in served.values()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name not in served:
            raise ServeError(404, f"no model {name!r}: this server has {', '.join(served)}", code="model_not_found")
        return served[name].describe()

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        request = parse_request(await read_body(http))
        target = served.get(request.model)
        if target is None:
            raise ServeError(404, f"no model {request.model!r}: this server has {', '.join(served)}",
                             code="model_not_found")
        try:  # off the event loop: images of up to --max-image-mb each are decoded
            turns = await asyncio.to_thread(prepare, target, request, config)
        except MmedgeError as exc:  # a bad option (pipe.options)
            raise ServeError(400, exc.message) from None
        target.admit(config.max_queue)
        job = Job(target, request, config, asyncio.get_running_loop(), turns)
        target.worker.submit(job.run)
        rid, created = f"chatcmpl-{next(ids)}-{int(time.time() * 1000)}", int(time.time())
        items = job.items()
        # a client that leaves while its request waits or (not streamed) runs: the job is cancelled, its place in
        # the queue freed (a stream's own end does that once it has started)
        watch = asyncio.create_task(_cancel_when_gone(http, job))
        try:  # errors found before the first piece (bad image, prompt too long) are an HTTP status
            first = await items.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            job.cancelled.set()
            watch.cancel()
            raise
        if not request.stream:
            text = [first] if first is not None else []
            try:
                async for piece in items:
                    text.append(piece)
            finally:
                job.cancelled.set()
                watch.cancel()
            r = job.result
            return {"id": rid, "object": "chat.completion", "created": created, "model": request.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": r.finish_reason}], "usage": _usage(r)}

        watch.cancel()  # from here the stream's end notices a client that leaves

        async def events():
            try:
                yield _chunk(rid, created, request.model, {"role": "assistant", "content": ""})
                if first is not None:
                    yield _chunk(rid, created, request.model, {"content": first})
                    try:
                        async for piece in items:
                            yield _chunk(rid, created, request.model, {"content": piece})
                    except ServeError as exc:  # the status is sent: the error goes in the stream
                        log.info("%d %s (in a stream)", exc.status, exc.message)
                        yield f"data: {json.dumps(exc.body())}\n\n"
                        return
                yield _chunk(rid, created, request.model, {}, job.result.finish_reason)
                if request.include_usage:
                    yield _chunk(rid, created, request.model, {}, usage=_usage(job.result))
                yield "data: [DONE]\n\n"
            finally:  # the client left: the worker stops at its next piece
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.state.served = served
    return app


def parse_packages(specs: list[str]) -> dict[str, Path]:
    """`name=path` or `path` (named after its directory, without .pkg), checked for clashes."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name.removesuffix(".pkg"), spec
        if not name or not path:
            raise InputError(f"{spec!r}: give a package as PATH or NAME=PATH, both parts non-empty")
        if name in out:
            raise InputError(f"two packages are named {name!r}: give them names, NAME=PATH")
        out[name] = Path(path)
    return out


def check_listen(host: str, port: int) -> None:
    """That a server can listen on host:port, tried before any package loads: a port in use or an address not on
    this machine was uvicorn's log lines and exit 3, after every package had loaded."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}; pass another --host") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port or --host") \
                from None


def serve(packages: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          **load_options: Any) -> None:
    """Load every package (each error a clear line before the port opens), then serve until interrupted."""
    import uvicorn

    from mmedge.runtimes.pipeline import Pipeline

    check_listen(host, port)
    models = {}
    for name, path in packages.items():
        models[name] = Pipeline.load(path, **load_options)
        log.info("serving %s (%s, %s) as %r", path, models[name].manifest.model_type, models[name].manifest.target,
                 name)
    app = create_app(models, config)
    uvicorn.run(app, host=host, port=port, log_level="info" if log.isEnabledFor(logging.INFO) else "warning")


def ray_app(packages: dict[str, Path], config: ServeConfig, replicas: int = 2, cpus_per_replica: float = 1.0,
            **load_options: Any):
    """The same app as a Ray Serve deployment: `replicas` processes (on any machine of the Ray cluster), each
    loading every package into a Pipeline of its own; Ray's proxy spreads requests over them, at most
    max_queue + 1 at a time on each."""
    from ray import serve as ray_serve

    paths = {name: str(Path(path).resolve()) for name, path in packages.items()}  # the replicas' working dir differs

    def build():  # runs on each replica
        from mmedge.runtimes.pipeline import Pipeline

        return create_app({name: Pipeline.load(path, **load_options) for name, path in paths.items()}, config)

    deployment = ray_serve.deployment(ray_serve.ingress(build)(), name="mmedge", num_replicas=replicas,
                                      max_ongoing_requests=config.max_queue + 1,
                                      ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment.bind()


def serve_ray(packages: dict[str, Path], host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
              replicas: int = 2, **load_options: Any) -> None:
    """Serve on Ray Serve: joins the cluster at $RAY_ADDRESS, or starts a local Ray instance; until interrupted."""
    import ray
    from ray import serve as ray_serve

    for name, path in packages.items():  # a bad package is one line here, not a replica failing to start
        from mmedge.manifest import load_manifest

        load_manifest(path, verify_files=False)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level=logging.WARNING)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(ray_app(packages, config or ServeConfig(), replicas, **load_options), name="mmedge",
                  route_prefix="/", blocking=True)
