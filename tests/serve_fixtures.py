"""What the serve tests share: a tiny random checkpoint with its tokenizer, serve.py started on a loopback port (and
stopped), and raw HTTP requests that return the status, the JSON answer and the headers."""
import http.client
import json
import socket
import subprocess
import sys
import time

from conftest import ENV, ROOT
from sft_fixtures import tiny_tokenizer
import torch

from babyllama.models import save_merged
from model import ModelArgs, Transformer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(d, ctx=64, dim=48, n_layers=2, seed=0, endless=False, zero_keys=False):
    """(checkpoint path, model, tokenizer) of a random model with weights N(0, 0.3) (greedy tokens far from ties).
    endless: the stop tokens' (tied) embeddings are zero, so their logit is 0 where the best of 400 random logits is
    far above: greedy answers run to max_tokens (a long request to leave or to cut short). zero_keys: every query
    weighs every earlier token the same, so the answer depends on the whole prompt (a crop shows)."""
    tok = tiny_tokenizer(d)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  max_seq_len=ctx, multiple_of=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
        if zero_keys:
            for layer in model.layers:
                layer.attention.wk.weight.zero_()
        if endless:
            model.tok_embeddings.weight[[tok.eos_id, tok.end_id]] = 0
    save_merged(str(d / "ckpt.pt"), model, iter_num=0, config={}, tokenizer=tok.model_path,
                tokenizer_sha256=tok.sha256())
    return d / "ckpt.pt", model, tok


def start_server(ckpt, *flags, output=subprocess.DEVNULL):
    """serve.py on a free loopback port, running once /health answers: (process, port)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--ckpt_path={ckpt}", f"--port={port}", "--dtype=float32",
                             *flags], cwd=ROOT, env=ENV, stdout=output, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited {proc.returncode}" + (f":\n{proc.stdout.read()}" if proc.stdout
                                                                          else ""))
        try:
            if raw(port, "GET", "/health", timeout=1)[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve.py did not answer /health in 60 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("serve.py did not exit within 15 s of SIGTERM")


def raw(port, method, path, body=None, headers=None, key=None, timeout=30):
    """(status, the JSON answer or None, headers as a dict) of one request; body: bytes, str or a JSON value;
    headers: added to Content-Type application/json (a None value removes one)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    data = body if isinstance(body, bytes) or body is None else body if isinstance(body, str) else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        text = r.read()
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = text.decode("utf-8", "replace")
        return r.status, answer, {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()
