"""
An OpenAI-compatible HTTP server for a checkpoint, on FastAPI + uvicorn, with a web chat page at /.

    python serve.py --ckpt_path=out/demo/sft/ckpt.pt                       # http://127.0.0.1:8000
    python serve.py --ckpt_path=... --host=0.0.0.0 --api_key=secret        # reachable from other machines

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="babyllama", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: GET /v1/models; POST /v1/chat/completions (the chat template of tokenizer/chat_template.py) and
POST /v1/completions (plain text after eos, as eval.py samples), streamed as server-sent events ending with
"data: [DONE]" or not; temperature, top_p, max_tokens, stop, seed, n=1; usage token counts.

Batching: one worker thread owns the model. Requests wait in a queue; the worker takes the oldest one and every
other request with the same sampling settings that is waiting or arrives within batch_wait_ms (up to max_batch)
and decodes them together with the
KV-cached generator (model.generate_batch_stream), each row streaming to its own client; requests that arrive
meanwhile form the next batch. A greedy answer is the same alone or in a batch (the batched generator equals
the unbatched one, tests/unit/test_generate.py). A request with a seed runs in a batch of its own, so its samples
depend only on the seed.

Limits, each answered with a 4xx JSON error {"error": {"message", "type", "code"}}: the request body
(max_body_bytes, 413), the prompt (the context less max_tokens, 400), max_tokens (max_tokens_limit, 400), the
queue (max_queue waiting requests, 429), a wrong or missing API key when --api_key is set (401), an unknown
model (404), malformed JSON or fields (400). The server binds 127.0.0.1 unless --host says otherwise.
"""
import asyncio
import json
import os
import queue
import threading
import time
import uuid

import torch

from babyllama.configurator import run_main
from babyllama.generate import generate_batch_stream, right_pad
from babyllama.inference import load_for_inference
from babyllama.int8 import quantize_model
from tokenizer import StreamDecoder
from tokenizer.chat_template import encode_prompt, stop_ids

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"
model_name = ""  # the id clients ask for; "" = the checkpoint's folder name
host = "127.0.0.1"
port = 8000
api_key = ""  # when set, every /v1 request must send "Authorization: Bearer <api_key>"
max_batch = 8  # requests decoded together
batch_wait_ms = 10.0  # how long a new batch waits for more requests to join it (Triton's max_queue_delay)
max_queue = 64  # requests waiting beyond that are refused (429)
max_tokens_limit = 0  # the largest max_tokens a request may ask for; 0 = max_seq_len // 2
default_max_tokens = 128
max_body_bytes = 1 << 20
quantize = ""  # 'int8': weight-only int8 linear layers (model.quantize_int8)
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------------------------------------

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "babyllama", "serve_page.html")


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status, message, code, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


class Job:
    """One request on its way through the worker: its prompt, settings, and the queue its events go to."""

    def __init__(self, prompt, max_tokens, sampling, stops, seed, loop):
        self.prompt, self.max_tokens, self.sampling, self.stops, self.seed = prompt, max_tokens, sampling, stops, seed
        self.loop, self.events = loop, asyncio.Queue()
        self.cancelled = False

    def send(self, event):
        """Called from the worker thread: hand an event to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """The model, the tokenizer and the worker thread that batches requests."""

    def __init__(self, model, tok, device, autocast_ctx):
        self.model, self.tok, self.device, self.autocast_ctx = model, tok, device, autocast_ctx
        self.stop_ids = stop_ids(tok)
        self.waiting = queue.Queue(maxsize=max_queue)
        self.stats = {"batches": 0, "rows": 0}
        threading.Thread(target=self.work, daemon=True).start()

    def submit(self, job):
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"too many requests waiting ({max_queue}); try again", "queue_full",
                           "rate_limit_error") from None

    def take_batch(self):
        """The oldest waiting job and the jobs with its sampling settings waiting or arriving within batch_wait_ms
        (a seeded job goes alone; the others go back in line for the next batch)."""
        first = self.waiting.get()
        batch, others = [first], []
        if first.seed is None:
            deadline = time.monotonic() + batch_wait_ms / 1000
            while len(batch) < max_batch:
                left = deadline - time.monotonic()
                try:
                    j = self.waiting.get(timeout=left) if left > 0 else self.waiting.get_nowait()
                except queue.Empty:
                    break
                (batch if j.sampling == first.sampling and j.seed is None else others).append(j)
        for j in others:  # back in line, in order, for the next batch
            self.waiting.put(j)
        return batch

    def work(self):
        while True:
            batch = [j for j in self.take_batch() if not j.cancelled]
            if batch:
                try:
                    self.run(batch)
                except Exception as e:  # answer every client of the batch rather than leave it hanging
                    for j in batch:
                        j.send(("error", f"{type(e).__name__}: {e}"))

    def run(self, batch):
        """Decode a batch; every row's text goes to its own job as it comes."""
        temperature, top_p = batch[0].sampling
        idx, lens = right_pad([j.prompt for j in batch], self.device)
        generator = None
        if batch[0].seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(batch[0].seed))
        rows = [Row(j, self.tok) for j in batch]
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        with self.autocast_ctx:
            stream = generate_batch_stream(self.model, idx, max(j.max_tokens for j in batch),
                                                      temperature=temperature, top_p=top_p,
                                                      stop_ids=self.stop_ids, prompt_lens=lens, generator=generator)
            for tokens, _ in stream:
                for row, t in zip(rows, tokens):
                    if not row.done:
                        row.add(t, t in self.stop_ids)
                if all(r.done for r in rows):
                    break
        for row in rows:
            if not row.done:
                row.end("length")


class Row:
    """One request's row of a batch: its text so far, what of it was sent, and when it ends. Text that could be
    the beginning of a stop string is held back until it is clear that it is not."""

    def __init__(self, job, tok):
        self.job, self.decoder = job, StreamDecoder(tok)
        self.text, self.sent, self.count, self.done = "", 0, 0, False
        self.hold = max((len(s) for s in job.stops), default=1) - 1

    def add(self, token, is_stop):
        if self.job.cancelled:
            self.done = True
            return
        if is_stop:
            self.end("stop")
            return
        self.count += 1
        self.text += self.decoder.put(token)
        cut = first_stop(self.text, self.job.stops)
        if cut is not None:
            self.text = self.text[:cut]
            self.end("stop", flush=False)
        elif self.count >= self.job.max_tokens:
            self.end("length")
        else:
            self.send_until(len(self.text) - self.hold)

    def send_until(self, n):
        if n > self.sent:
            self.job.send(("text", self.text[self.sent:n]))
            self.sent = n

    def end(self, reason, flush=True):
        if flush:
            self.text += self.decoder.flush()
            cut = first_stop(self.text, self.job.stops)
            if cut is not None:
                self.text, reason = self.text[:cut], "stop"
        self.send_until(len(self.text))
        self.job.send(("end", reason, self.count))
        self.done = True


def first_stop(text, stops):
    """Where the first stop string begins in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


# ---- request parsing ----------------------------------------------------------------------------------------

def number(body, name, default, lo, hi, kind=float):
    """body[name] as a number in [lo, hi] (default when absent or null); APIError 400 naming it otherwise."""
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v) or not lo <= v <= hi:
        raise APIError(400, f"{name} must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}], "
                            f"not {v!r}", f"invalid_{name}")
    return kind(v)


def common_settings(body, prompt_len, context):
    """(max_tokens, (temperature, top_p), stops, seed) of a request, checked against the limits."""
    limit = max_tokens_limit or context // 2
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported", "invalid_n")
    max_tokens = number(body, "max_tokens", min(default_max_tokens, limit), 1, 1 << 31, int)
    if max_tokens > limit:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limit}", "max_tokens_too_large")
    if prompt_len + max_tokens > context:
        raise APIError(400, f"the prompt is {prompt_len} tokens; with max_tokens {max_tokens} that is over the "
                            f"model's context of {context} tokens", "context_length_exceeded")
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, not {seed!r}", "invalid_seed")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of up to 4 strings", "invalid_stop")
    return max_tokens, (temperature, top_p), tuple(stops), seed


def chat_prompt(tok, body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "invalid_messages")
    system, turns = None, []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be {{\"role\": system|user|assistant, \"content\": str}}",
                           "invalid_messages")
        if m["role"] == "system":
            if i:
                raise APIError(400, "a system message may only come first", "invalid_messages")
            system = m["content"]
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    if not turns or turns[-1]["role"] != "user" or any(t["role"] != ("user", "assistant")[k % 2]
                                                       for k, t in enumerate(turns)):
        raise APIError(400, "messages must alternate user/assistant and end with a user message", "invalid_messages")
    return encode_prompt(tok, turns, system)


def completion_prompt(tok, body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string", "invalid_prompt")
    return [tok.eos_id] + tok.encode(prompt)  # a document start, as in pretraining


# ---- the app ------------------------------------------------------------------------------------------------

def create_app(engine, name):
    """The FastAPI application serving engine's model under the id name."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="babyllama", docs_url=None, redoc_url=None)
    context = engine.model.args.max_seq_len

    def error(e):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.code}}, status_code=e.status)

    async def body_of(request):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key",
                           "authentication_error")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", "body_too_large")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", "body_too_large")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", "invalid_json")
        if body.get("model") not in (name, None):
            raise APIError(404, f"model {body.get('model')!r} not found; this server has {name!r}", "model_not_found")
        return body

    async def complete(request, chat):
        try:
            body = await body_of(request)
            prompt = (chat_prompt if chat else completion_prompt)(engine.tok, body)
            max_tokens, sampling, stops, seed = common_settings(body, len(prompt), context)
            stream = bool(body.get("stream", False))
            job = Job(prompt, max_tokens, sampling, stops, seed, asyncio.get_running_loop())
            engine.submit(job)
        except APIError as e:
            return error(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(n):
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def chunk(text=None, finish=None, first=False, n=None):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            out = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": name,
                   "choices": [choice]}
            if n is not None:
                out["usage"] = usage(n)
            return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"

        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events():
                try:
                    if chat:
                        yield chunk(first=True)
                    while True:
                        ev = await job.events.get()
                        if ev[0] == "text":
                            if ev[1]:
                                yield chunk(ev[1])
                        elif ev[0] == "end":
                            yield chunk(finish=ev[1], n=ev[2] if include_usage else None)
                            break
                        else:
                            yield "data: " + json.dumps({"error": {"message": ev[1], "type": "server_error"}}) + "\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancelled = True  # a client that went away frees its row

            return StreamingResponse(events(), media_type="text/event-stream")
        text = ""
        while True:
            ev = await job.events.get()
            if ev[0] == "text":
                text += ev[1]
            elif ev[0] == "end":
                finish, n = ev[1], ev[2]
                break
            else:
                return error(APIError(500, ev[1], "server_error", "server_error"))
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": name, "choices": [choice],
                             "usage": usage(n)})

    @app.get("/v1/models")
    async def models(request: Request):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error(APIError(401, "missing or wrong API key", "invalid_api_key", "authentication_error"))
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "babyllama",
                                            "context_length": context}]}

    @app.get("/stats")
    async def stats():
        """How many batches the worker ran and how many requests they held (the mean batch size)."""
        return dict(engine.stats)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, False)

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


def main():
    import uvicorn
    model, tok, _, dev, autocast_ctx = load_for_inference(ckpt_path, device, dtype)  # the tokenizer it records
    quantize_model(model, quantize)
    name = model_name or os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))
    engine = Engine(model, tok, dev, autocast_ctx)
    print(f"serving {ckpt_path} as {name!r} on http://{host}:{port} (max_batch {max_batch})", flush=True)
    uvicorn.run(create_app(engine, name), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    run_main(globals(), main)
