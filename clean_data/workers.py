"""
The worker processes of a cleaning run (clean.py): pass 1's numbers per chunk of documents (analyse) and
pass 2's MinHash component checks (resolve_batch), fed a bounded number of tasks at a time (bounded).

With num_workers <= 1 both run in the calling process (start_pool returns None). The settings the workers
need (stages, filter thresholds, MinHash sizes) reach each process once, through the pool's initializer.
"""
from collections import deque
from contextlib import contextmanager
from multiprocessing import Pool
import time

import numpy as np

from clean_data import dedup, filters, shingles
from clean_data.normalize import normalize

_cfg = {}  # this process' settings, from start_pool


def _init(cfg):
    _cfg.clear()
    _cfg.update(cfg)


def start_pool(c, cfg):
    """num_workers processes set up with cfg, or None (cfg set up in this process) when num_workers <= 1."""
    if c.num_workers > 1:
        return Pool(c.num_workers, initializer=_init, initargs=(cfg,))
    _init(cfg)


@contextmanager
def timed(secs, stage):
    """Adds the seconds the with-block takes to secs[stage]."""
    t = time.perf_counter()
    yield
    secs[stage] = secs.get(stage, 0.0) + time.perf_counter() - t


def analyse(texts):
    """The parallel part for one chunk: the numbers each stage decides on. Returns a dict of arrays, one
    entry per text: "filter" int8 (0 = passes, else 1 + index in filters.FILTER_NAMES), "exact" uint64 key,
    "bands" (texts x bands) uint64 MinHash band hashes, "simhash" uint64 fingerprint (each only for its
    active stage), "empty" bool (no shingle once normalised: no near-duplicate comparison possible); "norm"
    the normalised texts as one UTF-8 string of "norm_len" bytes each (MinHash candidates are verified
    against them); "secs" the seconds each stage took here."""
    c, secs = _cfg, {}
    out = {"secs": secs}
    with timed(secs, "filter"):
        reasons = [filters.check(x, c["filters"]) for x in texts] if "filter" in c["stages"] else [None] * len(texts)
        out["filter"] = np.array([0 if r is None else 1 + filters.FILTER_NAMES.index(r) for r in reasons], np.int8)
    with timed(secs, "exact"):
        norms = [normalize(x, c["t2s"]) if r is None else "" for x, r in zip(texts, reasons)]
        if "exact" in c["stages"]:
            out["exact"] = np.fromiter((dedup.exact_key(s) for s in norms), np.uint64, len(norms))
    near = [s for s in ("minhash", "simhash") if s in c["stages"]]
    if near:
        with timed(secs, "shingles"):
            hashes, counts = shingles.shingle_hashes(norms, c["ngram"])
        if "minhash" in near:
            with timed(secs, "minhash"):
                sig = dedup.minhash_signatures(hashes, counts, dedup.permutations(c["num_perm"], c["minhash_seed"]))
                out["bands"] = dedup.band_hashes(sig, c["bands"])
                blobs = [s.encode("utf-8") for s in norms]
                out["norm"] = b"".join(blobs)
                out["norm_len"] = np.fromiter(map(len, blobs), np.int64, len(blobs))
        if "simhash" in near:
            with timed(secs, "simhash"):
                out["simhash"] = dedup.simhash_fingerprints(hashes, counts)
        shingle_secs = secs.pop("shingles")
        for stage in near:  # each near-duplicate stage needs the shingles: each is charged for them
            secs[stage] += shingle_secs
        out["empty"] = counts == 0
    return out


def resolve_batch(task):
    """MinHash verdicts for a batch of components (in a worker): [(j, i, jaccard)] as indices into the batch."""
    bands, texts, bounds, threshold, n = task
    out = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        out += [(lo + j, lo + i, jac) for j, i, jac in dedup.resolve_component(bands[lo:hi], texts[lo:hi], threshold, n)]
    return out


def bounded(pool, fn, items, in_flight):
    """(key, fn(arg)) for each (key, arg) of items, in order, with at most in_flight submitted and not yet
    collected. Pool.imap would read the whole input ahead into its task queue: memory bounded by the
    corpus instead of by the arrays."""
    if pool is None:
        for key, arg in items:
            yield key, fn(arg)
        return
    pending = deque()
    for key, arg in items:
        pending.append((key, pool.apply_async(fn, (arg,))))
        if len(pending) >= in_flight:
            k0, res = pending.popleft()
            yield k0, res.get()
    while pending:
        k0, res = pending.popleft()
        yield k0, res.get()
