"""
Load test of serve.py: starts the server on a loopback port, then measures with the `openai` client, for 1, 8 and 32
concurrent clients (each sending its requests one after the other, streamed, greedy), the completion tokens per
second of all clients together, the time to the first token (median and p95) and the server's mean batch size.
With batches that only form between requests, a request that arrives while a batch runs waits for the whole batch:
its time to the first token is what continuous batching cuts. One run, one machine: the ratios are what to compare.

    python bench_serve.py --ckpt_path=out/demo/sft/ckpt.pt
    python bench_serve.py --ckpt_path=out/demo/sft/ckpt.pt --quantize=int8 --clients=1,8
"""
import json
import math
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from babyllama.configurator import run_main
from babyllama.dist import free_port

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/demo/sft/ckpt.pt"
clients = "1,8,32"  # the numbers of concurrent clients measured, one after the other
requests_per_client = 4
max_tokens = 64
quantize = ""  # passed to serve.py
dtype = "auto"  # passed to serve.py
max_batch = 8  # passed to serve.py
# -----------------------------------------------------------------------------------------------------------

TITLES = "春夏秋冬山水风月花鸟云雨雪霜江河"


def start_server(port):
    cmd = [sys.executable, "serve.py", f"--ckpt_path={ckpt_path}", f"--port={port}", f"--dtype={dtype}",
           f"--max_batch={max_batch}", f"--max_tokens_limit={max_tokens}", f"--max_queue={max(64, 4 * max_batch)}"]
    proc = subprocess.Popen(cmd + ([f"--quantize={quantize}"] if quantize else []), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"serve.py exited:\n{proc.stdout.read()}")
            time.sleep(0.1)
    raise SystemExit("serve.py did not start in 60 s")


def p95(xs):
    """The nearest-rank 95th percentile."""
    return sorted(xs)[max(0, math.ceil(0.95 * len(xs)) - 1)]


def mean_batch(port):
    """(rows decoded, decoding steps) so far, from /stats; before continuous batching: (rows, batches)."""
    st = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats"))
    return (st["row_steps"], st["steps"]) if "row_steps" in st else (st["rows"], st["batches"])


def one_request(client, model, i):
    """(completion tokens, seconds to the first token, seconds in all) of one streamed greedy request."""
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"请写一首题为《{TITLES[i % len(TITLES)]}》的诗。"}],
        temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if ch.usage:
            n = ch.usage.completion_tokens
    return n, first or 0.0, time.perf_counter() - t0


def measure(client, model, n_clients):
    """Tokens/s of n_clients sending requests_per_client requests each, and the time-to-first-token list."""
    results, lock = [], threading.Lock()

    def run(c):
        for r in range(requests_per_client):
            out = one_request(client, model, c * requests_per_client + r)
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _, _ in results)
    return tokens / wall, [f for _, f, _ in results], tokens, wall


def main():
    from openai import OpenAI
    port = free_port()
    proc = start_server(port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        one_request(client, model, 0)  # warm-up
        rows = []
        for n in [int(c) for c in str(clients).split(",")]:
            r0, s0 = mean_batch(port)
            tps, ttft, tokens, wall = measure(client, model, n)
            r1, s1 = mean_batch(port)
            rows.append((n, tps, statistics.median(ttft), p95(ttft), tokens, wall, (r1 - r0) / max(s1 - s0, 1)))
        print(f"serve.py {ckpt_path} (quantize={quantize or 'none'}, dtype={dtype}, max_batch={max_batch}), "
              f"{requests_per_client} streamed greedy requests per client, up to {max_tokens} tokens each")
        print("| clients | tokens/s (all clients) | vs 1 client | time to first token, median / p95 | tokens | "
              "seconds | mean batch |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n, tps, med, worst, tokens, wall, batch in rows:
            print(f"| {n} | {tps:.1f} | {tps / rows[0][1]:.2f}x | {med * 1000:.0f} / {worst * 1000:.0f} ms | "
                  f"{tokens} | {wall:.1f} | {batch:.1f} |")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    run_main(globals(), main)
