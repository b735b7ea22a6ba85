"""
Several processes or machines cleaning one corpus through one Redis server, with the same kept set as a
single process: shard s of num_shards holds a contiguous part of the corpus (shard 0 the first part), and
document order is (shard, position in shard).

Why Redis: the pipeline already used it, every machine can reach one server, and what the shards exchange
is a few compact arrays per shard (binary strings) plus the texts of the documents whose candidates live
on another shard; no task scheduler is needed because every shard runs the same deterministic
computation on the same arrays. (Ray or Dask would add a cluster to operate for what is three barriers.)

Phases, each ended by a barrier (every shard has published; then every shard reads):
1. "keys": each shard publishes its per-document arrays (filter code, exact key, band hashes, fingerprint);
   every shard reads all of them and computes the exact duplicates and the MinHash candidate components of
   the whole corpus (identical everywhere: same arrays, same code).
2. "texts": each shard publishes the normalised texts of its documents in components that span shards;
   each shard then resolves every component holding one of its documents (texts of the others from
   Redis) and so decides its own documents.
3. "minhash": each shard publishes its documents' MinHash verdicts; every shard computes SimHash over the
   survivors of the whole corpus and decides its own documents.
Then each shard writes its parquet part and report; the last shard to finish writes the combined report
and deletes the run's keys.

A barrier waits at most `timeout` seconds (a shard that never comes: an error naming the missing shards).
"""
import json
import socket
import subprocess
import time
from urllib.parse import urlparse

import numpy as np

_PART = 32 << 20  # bytes per Redis value: arrays are split (Redis strings stop at 512 MB)


def redis_params(url):
    """redis://host:port/db -> redis.Redis keyword arguments."""
    u = urlparse(url)
    return {"host": u.hostname or "localhost", "port": u.port or 6379,
            "db": int(u.path.strip("/") or 0), **({"password": u.password} if u.password else {})}


def start_server(exe, folder):
    """A private redis-server (no persistence) on a free local port, for tests and benchmarks: (process, url),
    once it answers PING."""
    import redis
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def connect(url):
    import redis
    return redis.Redis(**redis_params(url))


def claim(r, prefix, shard_id):
    """Register this shard for the run; ValueError when the prefix already holds this shard (a previous run's
    keys: choose another redis_prefix or delete them)."""
    if not r.sadd(f"{prefix}:shards", shard_id):
        raise ValueError(f"redis prefix {prefix!r} already has shard {shard_id} (an earlier run?): "
                         f"use another redis_prefix or delete the keys {prefix}:*")


def publish(r, prefix, phase, shard_id, arrays):
    """Store each array of the dict under {prefix}:{phase} (dtype, shape, then the bytes in parts)."""
    pipe = r.pipeline(transaction=False)
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        blob = a.tobytes()
        parts = max(1, -(-len(blob) // _PART))
        pipe.hset(f"{prefix}:{phase}", f"{shard_id}:{name}:meta",
                  json.dumps({"dtype": a.dtype.str, "shape": a.shape, "parts": parts}))
        for p in range(parts):
            pipe.hset(f"{prefix}:{phase}", f"{shard_id}:{name}:{p}", blob[p * _PART:(p + 1) * _PART])
    pipe.execute()


def barrier(r, prefix, phase, shard_id, num_shards, timeout):
    """Mark this shard done with phase and wait for all num_shards. TimeoutError naming the missing ones."""
    key = f"{prefix}:done:{phase}"
    r.sadd(key, shard_id)
    t0 = time.time()
    while r.scard(key) < num_shards:
        if time.time() - t0 > timeout:
            done = {int(x) for x in r.smembers(key)}
            missing = sorted(set(range(num_shards)) - done)
            raise TimeoutError(f"redis barrier {phase!r}: shards {missing} did not arrive in {timeout} s")
        time.sleep(0.02)


def fetch(r, prefix, phase, shard_id, name):
    """One array a shard published."""
    meta = json.loads(r.hget(f"{prefix}:{phase}", f"{shard_id}:{name}:meta"))
    blob = b"".join(r.hmget(f"{prefix}:{phase}", [f"{shard_id}:{name}:{p}" for p in range(meta["parts"])]))
    return np.frombuffer(blob, dtype=meta["dtype"]).reshape(meta["shape"])


def fetch_all(r, prefix, phase, num_shards, names):
    """Every shard's arrays of `names`, concatenated in shard order: dict name -> array."""
    return {name: np.concatenate([fetch(r, prefix, phase, s, name) for s in range(num_shards)])
            for name in names}


def publish_texts(r, prefix, positions, texts):
    """Normalised texts by global position, for the shards that verify candidates against them."""
    pipe = r.pipeline(transaction=False)
    for p, t in zip(positions.tolist(), texts):
        pipe.hset(f"{prefix}:text", p, t.encode("utf-8"))
    pipe.execute()


def fetch_texts(r, prefix, positions):
    """Texts published by publish_texts; KeyError naming a position no shard published."""
    values = r.hmget(f"{prefix}:text", positions.tolist()) if len(positions) else []
    missing = [int(p) for p, v in zip(positions, values) if v is None]
    if missing:
        raise KeyError(f"redis {prefix}:text lacks the texts of positions {missing[:5]}")
    return [v.decode("utf-8") for v in values]


def finish(r, prefix, shard_id, num_shards, report):
    """Publish this shard's report; the last shard to finish gets every report back (in shard order) and
    deletes the run's keys, the others get None."""
    r.hset(f"{prefix}:reports", shard_id, json.dumps(report, ensure_ascii=False))
    if r.incr(f"{prefix}:finished") < num_shards:
        return None
    reports = [json.loads(r.hget(f"{prefix}:reports", s)) for s in range(num_shards)]
    for key in r.scan_iter(match=f"{prefix}:*"):
        r.delete(key)
    return reports


class RedisHub:
    """The Redis side of decide.decide for this process' shard of a multi-shard run (the phases above)."""

    def __init__(self, r, c, starts, local_texts):
        self.r, self.c, self.starts, self.local_texts = r, c, starts, local_texts
        self.lo, self.hi = starts[c.shard_id], starts[c.shard_id + 1]

    def is_mine(self, positions):
        return (positions >= self.lo) & (positions < self.hi)

    def share_texts(self, members, bounds):
        """Publish my documents' texts in components that span shards; wait for every shard to have done so."""
        shard = np.searchsorted(self.starts, members, side="right") - 1
        sizes = np.diff(bounds)
        first = np.minimum.reduceat(shard, bounds[:-1]) if len(members) else shard
        last = np.maximum.reduceat(shard, bounds[:-1]) if len(members) else shard
        spans = np.repeat(first != last, sizes)
        out = members[spans & self.is_mine(members)]
        publish_texts(self.r, self.c.redis_prefix, out, self.local_texts(out - self.lo))
        barrier(self.r, self.c.redis_prefix, "texts", self.c.shard_id, self.c.num_shards, self.c.redis_timeout)

    def texts_at(self, positions):
        mine = self.is_mine(positions)
        out = np.empty(len(positions), object)
        out[mine] = self.local_texts(positions[mine] - self.lo)
        out[~mine] = fetch_texts(self.r, self.c.redis_prefix, positions[~mine])
        return out.tolist()

    def merge(self, code):
        """Every shard's verdicts for its own documents, after MinHash."""
        p = self.c.redis_prefix
        publish(self.r, p, "minhash", self.c.shard_id, {"code": code[self.lo:self.hi]})
        barrier(self.r, p, "minhash", self.c.shard_id, self.c.num_shards, self.c.redis_timeout)
        return fetch_all(self.r, p, "minhash", self.c.num_shards, ["code"])["code"].copy()
