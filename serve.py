"""
An OpenAI-compatible HTTP server for a checkpoint, on FastAPI + uvicorn, with a web chat page at /.

    python serve.py --ckpt_path=out/demo/sft/ckpt.pt                       # http://127.0.0.1:8000
    python serve.py --ckpt_path=... --host=0.0.0.0 --allowed_hosts=myhost.lan --api_key=secret

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="babyllama", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: GET /v1/models; POST /v1/chat/completions (the chat template of tokenizer/chat_template.py) and
POST /v1/completions (plain text after eos, as eval.py samples), streamed as server-sent events ending with
"data: [DONE]" or not; GET /stats (the scheduler's counters), GET /health, GET / (the chat page). The parameters
implemented, and those refused by name, are listed in babyllama/openai_api.py.

Batching (babyllama/scheduler.py): one loop thread owns the model and the running batch; a request joins it at the
next decoding step and leaves it when done, each decoded as if alone (its own prompt, max_tokens, stop and
sampling). A client that disconnects frees its row at the next step. SIGTERM / SIGINT: no new request, in-flight
ones get shutdown_grace seconds to finish, then are ended, and the process exits.

At the door, each refusal a JSON error {"error": {"message", "type", "param", "code"}}: a Host header that is not a
loopback name, --host or one of --allowed_hosts (400; the guard against DNS rebinding); a wrong or missing key when
--api_key is set (401, on every route but / and /health; compared in constant time); a body that is not
application/json (415), over max_body_bytes (413, counted while reading, chunked or not) or slower than
body_timeout (408); max_queue requests already waiting (429 with Retry-After). Connections beyond max_connections
are answered 503 and closed; a connection that has not sent its request headers header_timeout seconds after
it opened (or after its last response) is closed.
"""
import asyncio
import hmac
import json
import os
import time
import uuid

from babyllama.configurator import run_main
from babyllama.inference import load_for_inference
from babyllama.int8 import quantize_model
from babyllama.openai_api import APIError, parse_body, request_of
from babyllama.scheduler import SHUTDOWN, Closed, QueueFull, Sampling, Scheduler, Sequence
from tokenizer import StreamDecoder
from tokenizer.chat_template import stop_ids

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer the checkpoint records, or its copy beside the checkpoint
model_name = ""  # the id clients ask for; "" = the checkpoint's folder name
host = "127.0.0.1"
port = 8000
allowed_hosts = ""  # comma-separated Host names accepted besides loopback and host ("*" = any: no rebinding guard)
api_key = ""  # when set, every route but / and /health needs "Authorization: Bearer <api_key>"
max_batch = 8  # requests decoded together
max_queue = 64  # requests waiting for a row beyond that are refused (429)
max_tokens_limit = 0  # the largest max_tokens a request may ask for; 0 = max_seq_len // 2
default_max_tokens = 128  # when a request does not say (lowered to the limit and to what its prompt leaves)
max_body_bytes = 1 << 20
max_connections = 256  # open connections at once; more are answered 503 and closed
header_timeout = 10.0  # seconds a connection may take to send its request headers
body_timeout = 30.0  # seconds a request may take to send its body
keep_alive = 5  # seconds an idle connection stays open between requests
shutdown_grace = 2.0  # seconds in-flight requests may still run after SIGTERM / SIGINT
quantize = ""  # 'int8': weight-only int8 linear layers (babyllama/int8.py)
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------------------------------------

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "babyllama", "serve_page.html")
LOOPBACK = {"localhost", "127.0.0.1", "::1"}
OPEN_PATHS = {"/", "/health"}  # what a client without the key may read: the page's HTML and the liveness probe


class Job(Sequence):
    """A request in the scheduler, turned into text for its HTTP handler: events ("text", str), then ("end",
    finish_reason, completion tokens) or ("error", message) on an asyncio queue of loop. Text that could be the
    beginning of a stop string is held back until it is clear that it is not."""

    def __init__(self, prompt, settings, tok, loop):
        super().__init__(prompt, settings.max_tokens, Sampling(**settings.sampling), stop_ids(tok))
        self.stops, self.loop, self.events = settings.stops, loop, asyncio.Queue()
        self.decoder = StreamDecoder(tok)
        self.text, self.sent, self.cut = "", 0, False
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def send(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    def on_token(self, token):
        self.text += self.decoder.put(token)
        self.cut = self.trim()
        if not self.cut:
            self.send_until(len(self.text) - self.hold)
        return self.cut

    def on_end(self, reason):
        if reason.startswith("error"):
            self.send(("error", reason[len("error: "):]))
            return
        if not self.cut:
            self.text += self.decoder.flush()
            reason = "stop" if self.trim() else reason
        self.send_until(len(self.text))
        self.send(("end", reason, self.n_generated))

    def trim(self):
        """Cut the text at its first stop string; True if there was one."""
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def send_until(self, n):
        if n > self.sent:
            self.send(("text", self.text[self.sent:n]))
            self.sent = n


# ---- the door: host, key, body -------------------------------------------------------------------------------

def host_name(value):
    """The name of a Host header value, without its port: 'a:8000' -> 'a', '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware that checks every request before a route sees it: the Host header (DNS rebinding: a page on
    another site that resolves its name to 127.0.0.1 sends its own Host) and the API key."""

    def __init__(self, app, hosts, key):
        self.app, self.hosts, self.key = app, hosts, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.check(scope["path"], dict(scope["headers"]))
            if err is not None:
                await asgi_error(err, send)
                return
        await self.app(scope, receive, send)

    def check(self, path, headers):
        name = host_name(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.hosts and name not in self.hosts:
            return APIError(400, f"Host {name!r} is not served here (allowed: loopback names, --host and "
                                 f"--allowed_hosts)", "invalid_host")
        if self.key and path not in OPEN_PATHS and \
                not hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + self.key):
            return APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key",
                            kind="authentication_error")
        return None


async def asgi_error(e, send):
    """Answer e as JSON on a raw ASGI send (before any route)."""
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_json(request):
    """The request's JSON object, read chunk by chunk: APIError 415 unless the body is application/json, 413 as soon as
    more than max_body_bytes arrived (chunked or not), 408 when the body takes over body_timeout; the error answers of
    a body not read to its end close the connection."""
    close = {"Connection": "close"}
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "the body must be application/json", "unsupported_media_type", headers=close)
    size = request.headers.get("content-length", "0")
    if not size.isdigit() or int(size) > max_body_bytes:
        raise APIError(413, f"request body over {max_body_bytes} bytes", "body_too_large", headers=close)
    chunks, n = [], 0
    try:
        async with asyncio.timeout(body_timeout):
            more = True
            while more:
                message = await request.receive()  # uvicorn reads at most 64 KiB ahead of this
                if message["type"] == "http.disconnect":
                    raise APIError(400, "the client left while sending its body", "client_disconnected")
                chunks.append(message.get("body", b""))
                n, more = n + len(chunks[-1]), message.get("more_body", False)
                if n > max_body_bytes:
                    raise APIError(413, f"request body over {max_body_bytes} bytes", "body_too_large", headers=close)
    except TimeoutError:
        raise APIError(408, f"the body took over {body_timeout} s", "request_timeout", headers=close) from None
    return parse_body(b"".join(chunks))


async def watch_disconnect(request, job):
    """Wait until the client of a non-streaming request goes away, then cancel its job (its row is freed at the next
    step) and wake its handler. Cancelled by the handler when the answer is ready."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True
    job.events.put_nowait(("gone",))


# ---- the app ------------------------------------------------------------------------------------------------

def create_app(scheduler, tok, name, hosts, key):
    """The ASGI application serving scheduler's model (with tokenizer tok) under the id name; hosts: the Host
    names accepted; key: the API key ("" = none)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

    app = FastAPI(title="babyllama", docs_url=None, redoc_url=None, openapi_url=None)
    context = scheduler.ctx
    limit = min(max_tokens_limit or context // 2, context - 1)

    def error(e):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request, exc):  # Starlette's 404 and 405, in the OpenAI shape
        code = {404: "not_found", 405: "method_not_allowed"}[exc.status_code]
        return error(APIError(exc.status_code, str(exc.detail), code, headers=dict(exc.headers or {})))

    for status in (404, 405):
        app.add_exception_handler(status, http_error)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        return error(APIError(500, f"{type(exc).__name__}: {exc}", "server_error", kind="server_error"))

    def submit(job):
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"too many requests waiting ({scheduler.max_queue}); try again", "queue_full",
                           kind="rate_limit_error", headers={"Retry-After": str(e.retry_after)}) from None
        except Closed:
            raise APIError(503, "the server is shutting down", "server_shutting_down", kind="server_error") from None
        except ValueError as e:  # what openai_api let through but the scheduler refuses: still the client's input
            raise APIError(400, str(e), "invalid_request") from None

    async def complete(request, kind):
        try:
            body = await read_json(request)
            if body.get("model") is not None and body.get("model") != name:
                raise APIError(404, f"model {body.get('model')!r} not found; this server has {name!r}",
                               "model_not_found", "model")
            prompt, settings = request_of(tok, body, kind, context, limit, default_max_tokens)
            job = Job(prompt, settings, tok, asyncio.get_running_loop())
            submit(job)
        except APIError as e:
            return error(e)
        answer = Answer(kind, name, len(prompt))
        if settings.stream:
            return StreamingResponse(stream_events(job, answer, settings.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            text = ""
            while True:
                ev = await job.events.get()
                if ev[0] == "text":
                    text += ev[1]
                elif ev[0] == "end":
                    return JSONResponse(answer.whole(text, ev[1], ev[2]))
                elif ev[0] == "error":
                    return error(failure(ev[1]))
                else:  # gone: nobody reads the answer
                    return Response(status_code=499)
        finally:
            watcher.cancel()
            job.cancelled = True  # a no-op once it ended; frees its row if the handler itself was cancelled

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "babyllama",
                                            "context_length": context, "max_tokens_limit": limit}]}

    @app.get("/stats")
    async def stats():
        """The scheduler's counters: row_steps / steps is the mean batch size."""
        return scheduler.stats()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    app.add_middleware(Guard, hosts=hosts, key=key)
    return app


def failure(message):
    """The APIError of a request the scheduler ended with an error: 503 when the server is shutting down."""
    if "error: " + message == SHUTDOWN:
        return APIError(503, message, "server_shutting_down", kind="server_error")
    return APIError(500, message, "server_error", kind="server_error")


class Answer:
    """The OpenAI response shapes of one request: the whole answer, or its stream's chunks."""

    def __init__(self, kind, model, prompt_tokens):
        self.chat, self.model, self.prompt_tokens = kind == "chat", model, prompt_tokens
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def usage(self, n):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def head(self, obj, choices):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text, finish, n):
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return dict(self.head(self.object, [choice]), usage=self.usage(n))

    def chunk(self, text=None, finish=None, first=False, usage=None):
        """One server-sent event; usage: the final chunk of include_usage, with no choices (OpenAI's reference)."""
        if usage is not None:
            out = dict(self.head(self.object + ".chunk" if self.chat else self.object, []), usage=self.usage(usage))
        elif self.chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            out = self.head("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish}])
        else:
            out = self.head(self.object, [{"index": 0, "text": text or "", "finish_reason": finish}])
        return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"


async def stream_events(job, answer, include_usage):
    """The server-sent events of a streamed request. A client that goes away ends this generator (Starlette cancels
    it), and its job is cancelled: its row is freed at the next step."""
    try:
        if answer.chat:
            yield answer.chunk(first=True)
        while True:
            ev = await job.events.get()
            if ev[0] == "text":
                yield answer.chunk(ev[1])
            elif ev[0] == "end":
                yield answer.chunk(finish=ev[1])
                if include_usage:
                    yield answer.chunk(usage=ev[2])
                break
            else:  # an error event in the OpenAI shape (the status line, 200, went out with the first chunk)
                yield "data: " + json.dumps(failure(ev[1]).body()) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


# ---- the server -----------------------------------------------------------------------------------------------

def run_server(app, scheduler):
    """uvicorn with the limits at the door (connections, header timeout) and a shutdown that ends in-flight work."""
    import uvicorn
    from uvicorn.protocols.http import h11_impl

    busy = json.dumps(APIError(503, "too many connections", "too_many_connections", kind="server_error").body())
    busy = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(busy)}\r\n\r\n{busy}").encode()

    class Protocol(h11_impl.H11Protocol):
        """uvicorn's HTTP/1.1 protocol with a cap on connections and a deadline for each request's headers."""
        timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self.arm()

        def on_response_complete(self):
            super().on_response_complete()
            self.arm()

        def arm(self):
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(header_timeout, self.headers_late)

        def headers_late(self):
            # still waiting for a request line and headers (slowloris): close; a request under way is not touched
            if self.conn.their_state is h11_impl.h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc):
            if self.timer is not None:
                self.timer.cancel()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.close(shutdown_grace)  # in-flight requests finish or are ended: their handlers return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, http=Protocol, log_level="warning",
                            timeout_keep_alive=keep_alive, timeout_graceful_shutdown=int(shutdown_grace) + 3)
    Server(config).run()


def main():
    model, tok, _, _, autocast_ctx = load_for_inference(ckpt_path, device, dtype, tokenizer_model)
    quantize_model(model, quantize)
    name = model_name or os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, autocast_ctx=autocast_ctx)
    hosts = LOOPBACK | {host_name(h) for h in allowed_hosts.split(",") + [host] if h.strip()} - {"0.0.0.0", "::"}
    app = create_app(scheduler, tok, name, hosts, api_key)
    print(f"serving {ckpt_path} as {name!r} on http://{host}:{port} (max_batch {max_batch})", flush=True)
    if host in ("0.0.0.0", "::") and not allowed_hosts:
        print("only loopback Host names are accepted: give the names clients use with --allowed_hosts", flush=True)
    run_server(app, scheduler)


if __name__ == "__main__":
    run_main(globals(), main)
