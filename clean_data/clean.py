"""
Clean a corpus: read -> quality filters -> exact dedup -> MinHash near-dup -> SimHash near-dup -> parquet.

    python -m clean_data --input=data/chinese-poetry --out_dir=out/clean/poetry
    python -m clean_data --input=a.jsonl,b/ --stages=filter,exact          # any subset, in this order
    python -m clean_data --input=out/clean/poetry/clean.parquet --stages=simhash --simhash_k=4
    python -m clean_data --input=part1/ --redis_url=redis://10.0.0.5:6379/0 --shard_id=1 --num_shards=4

From Python, the same settings by name (the globals below are the defaults):

    from clean_data.clean import clean
    report = clean("data/chinese-poetry", "out/clean/poetry", stages="filter,exact", num_workers=4)

Writes out_dir/clean.parquet (text, source, line, title, author, collection, id; zstd, row groups),
out_dir/report.json (documents in/out per stage, removals per filter, seconds and docs/s per stage, peak
RSS, bytes per document, read errors) and, with write_removed, out_dir/removed.jsonl (every removed document
and its reason; for duplicates, dup_of = the running number of the kept document it duplicates, and its
exact Jaccard or Hamming distance). The input is checked before out_dir is touched (a path that does not
exist, an unsupported file, no file or no document at all: an error naming the input, exit status 1 from
the command line); the outputs are written under temporary names and renamed at the end, so a failed run
leaves the files of the last good one byte-identical.

Three passes, memory O(compact arrays):
1. stream: documents are read in chunks of chunk_docs; a pool of num_workers processes normalises,
   filters and computes exact keys, MinHash band hashes and SimHash fingerprints per chunk; this process
   keeps those numbers (numpy arrays, ~200 bytes a document), appends every document to a scratch parquet
   file and its normalised text to a scratch text file.
2. decide (dedup.py states the rule): exact duplicates by sorting keys, MinHash candidates by sorting band
   hashes, union-find components, each verified by exact Jaccard from the texts read back (components
   spread over the pool), SimHash pairs by permuted-table sorting; every verdict in document order.
3. write: the scratch parquet is read back in batches, kept rows go to clean.parquet, removed ones to
   removed.jsonl.

With redis_url and num_shards > 1, each of num_shards processes (any machines) cleans a contiguous part of
the corpus (shard_id 0 the first) and exchanges its arrays through Redis (clean_data/shards.py): the kept
set equals the single process's on the whole corpus, whatever the start order. Each shard writes its own
out_dir; the last to finish adds report_all.json (all shards summed) to its out_dir.
"""
from collections import deque
from contextlib import ExitStack, contextmanager
import itertools
import json
from multiprocessing import Pool
import os
import resource
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from babyllama.atomic import atomic_path
from babyllama.configurator import config_of
from babyllama.readers import EmptyInputError, input_files, read_files
from babyllama.records import ReadErrors, parquet_file
from clean_data import dedup, filters, shards
from clean_data.normalize import normalize

# -----------------------------------------------------------------------------
input = "data/chinese-poetry"  # comma-separated files / directories / globs (jsonl/json/parquet/txt)
out_dir = "out/clean"
text_field = ""  # "" = auto-detect
txt_mode = "line"
stages = "filter,exact,minhash,simhash"  # which stages run (always in this order)
t2s = False  # fold traditional to simplified for comparison (needs the opencc package)
min_chars = filters.DEFAULTS["min_chars"]
max_chars = filters.DEFAULTS["max_chars"]
min_text_frac = filters.DEFAULTS["min_text_frac"]
max_dup_line_frac = filters.DEFAULTS["max_dup_line_frac"]
max_dup_ngram_frac = filters.DEFAULTS["max_dup_ngram_frac"]
dup_ngram = filters.DEFAULTS["dup_ngram"]
max_symbol_frac = filters.DEFAULTS["max_symbol_frac"]
ngram = 5  # character shingle size for MinHash and SimHash
num_perm = 120
bands = 20  # LSH bands of num_perm / bands rows: candidate probability 0.998 at J = 0.8, 0.27 at J = 0.5
threshold = 0.8  # MinHash: exact Jaccard at or above which a candidate is a near-duplicate
minhash_seed = 1
simhash_k = 3  # SimHash: Hamming distance at or below which a document is a near-duplicate
num_workers = 2  # processes for the per-chunk numbers and the candidate checks; <= 1: this process
chunk_docs = 2000
row_group_size = 50_000
write_removed = True
redis_url = ""  # e.g. redis://localhost:6379/0: num_shards processes clean one corpus together
redis_prefix = "babyllama"  # one run's keys (deleted by the last shard to finish)
shard_id = 0  # this process' part of the corpus, 0 .. num_shards-1 in corpus order; ids = shard_id * 10**12 + n
num_shards = 1
redis_timeout = 3600.0  # seconds a shard waits for the others at a barrier
# -----------------------------------------------------------------------------
# the settings clean() takes by name, with their defaults: every hyperparameter above but the two paths
DEFAULTS = {k: v for k, v in config_of(globals()).items() if k not in ("input", "out_dir")}

STAGES = ("filter", "exact", "minhash", "simhash")
DUP_REASON = {"exact": "exact_dup", "minhash": "near_dup", "simhash": "near_dup"}
META_COLUMNS = ("line", "title", "author", "collection", "id")
ID_STRIDE = 10 ** 12  # document id = shard_id * ID_STRIDE + running number in the shard

# ---- pass 1: per chunk, in worker processes ---------------------------------------------------------------

_cfg = {}


def _init(cfg):
    _cfg.clear()
    _cfg.update(cfg)


@contextmanager
def _timed(secs, stage):
    """Adds the seconds the with-block takes to secs[stage]."""
    t = time.perf_counter()
    yield
    secs[stage] = secs.get(stage, 0.0) + time.perf_counter() - t


def _analyse(texts):
    """The parallel part for one chunk: the numbers each stage decides on. Returns a dict of arrays, one
    entry per text: "filter" int8 (0 = passes, else 1 + index in filters.FILTER_NAMES), "exact" uint64 key,
    "bands" (texts x bands) uint64 MinHash band hashes, "simhash" uint64 fingerprint (each only for its
    active stage), "empty" bool (no shingle once normalised: no near-duplicate comparison possible); "norm"
    the normalised texts as one UTF-8 string of "norm_len" bytes each (MinHash candidates are verified
    against them); "secs" the seconds each stage took here."""
    c, secs = _cfg, {}
    out = {"secs": secs}
    with _timed(secs, "filter"):
        reasons = [filters.check(x, c["filters"]) for x in texts] if "filter" in c["stages"] else [None] * len(texts)
        out["filter"] = np.array([0 if r is None else 1 + filters.FILTER_NAMES.index(r) for r in reasons], np.int8)
    with _timed(secs, "exact"):
        norms = [normalize(x, c["t2s"]) if r is None else "" for x, r in zip(texts, reasons)]
        if "exact" in c["stages"]:
            out["exact"] = np.fromiter((dedup.exact_key(s) for s in norms), np.uint64, len(norms))
    near = [s for s in ("minhash", "simhash") if s in c["stages"]]
    if near:
        with _timed(secs, "shingles"):
            hashes, counts = dedup.shingle_hashes(norms, c["ngram"])
        if "minhash" in near:
            with _timed(secs, "minhash"):
                sig = dedup.minhash_signatures(hashes, counts, dedup.permutations(c["num_perm"], c["minhash_seed"]))
                out["bands"] = dedup.band_hashes(sig, c["bands"])
                blobs = [s.encode("utf-8") for s in norms]
                out["norm"] = b"".join(blobs)
                out["norm_len"] = np.fromiter(map(len, blobs), np.int64, len(blobs))
        if "simhash" in near:
            with _timed(secs, "simhash"):
                out["simhash"] = dedup.simhash_fingerprints(hashes, counts)
        shingle_secs = secs.pop("shingles")
        for stage in near:  # each near-duplicate stage needs the shingles: each is charged for them
            secs[stage] += shingle_secs
        out["empty"] = counts == 0
    return out


def _chunks(docs, size):
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _bounded(pool, fn, items, in_flight):
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


class ParquetSink:
    """Appends documents to one parquet file at path, a row group every row_group_size rows (clean() gives
    it a temporary path, renamed over clean.parquet once the whole run has succeeded)."""

    def __init__(self, path, row_group_size):
        self.pa = pa
        self.schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("line", pa.int64())] +
                                [(k, pa.string()) for k in META_COLUMNS[1:]])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows, self.tables, self.row_group_size, self.n = [], [], row_group_size, 0

    def add(self, doc):
        self.rows.append(doc)
        if len(self.rows) >= self.row_group_size:
            self.flush()

    def add_table(self, table):
        """Rows already in this schema (read back from the scratch file); written a row group at a time."""
        self.tables.append(table)
        if sum(t.num_rows for t in self.tables) >= self.row_group_size:
            self.flush()

    def flush(self):
        if self.rows:
            cols = {"text": [d["text"] for d in self.rows], "source": [str(d.get("source", "")) for d in self.rows],
                    "line": [d.get("line") for d in self.rows]}
            for k in META_COLUMNS[1:]:
                cols[k] = [None if d.get(k) is None else str(d[k]) for d in self.rows]
            self.tables.append(self.pa.Table.from_pydict(cols, schema=self.schema))
            self.rows = []
        if self.tables:
            table = self.pa.concat_tables(self.tables)
            self.writer.write_table(table, row_group_size=self.row_group_size)
            self.n += table.num_rows
            self.tables = []

    def close(self):
        """Write the last rows and the footer (closing twice is harmless: pyarrow's close is idempotent)."""
        self.flush()
        self.writer.close()


def _text_reader(buf, offsets):
    """positions -> normalised texts from buf (bytes; offsets: (N + 1,) byte offsets into it)."""
    return lambda positions: [buf[offsets[p]:offsets[p + 1]].decode("utf-8") for p in positions.tolist()]


def _file_text_reader(fd, offsets):
    """positions -> normalised texts read back from the scratch text file open as fd. pread, not mmap: the
    pages an mmap touches count in this process' RSS."""
    return lambda positions: [os.pread(fd, int(offsets[p + 1] - offsets[p]), int(offsets[p])).decode("utf-8")
                              for p in positions.tolist()]


# ---- pass 2: verdicts over the arrays of the whole corpus --------------------------------------------------

def _resolve_batch(task):
    """MinHash verdicts for a batch of components (in a worker): [(j, i, jaccard)] as indices into the batch."""
    bands, texts, bounds, threshold, n = task
    out = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        out += [(lo + j, lo + i, jac) for j, i, jac in dedup.resolve_component(bands[lo:hi], texts[lo:hi], threshold, n)]
    return out


def _batches(members, bounds, size):
    """Cut the components (members[bounds[c]:bounds[c+1]]) into runs of about `size` members: (lo, hi, bounds
    relative to lo) per batch."""
    lo = 0
    while lo < len(bounds) - 1:
        hi = max(int(np.searchsorted(bounds, bounds[lo] + size, side="right")) - 1, lo + 1)
        yield bounds[lo], bounds[hi], bounds[lo:hi + 1] - bounds[lo]
        lo = hi


def _decide(a, c, walk, pool, texts_at, own, hub=None):
    """Verdicts for the arrays a of the whole corpus (document order), by the rule in dedup.py. Returns (code,
    partner, score, secs): code int8 per document (0 kept, else 1 + index in STAGES of the stage that removed
    it), partner int64 (position of the document it duplicates, -1), score float32 (exact Jaccard for
    minhash, Hamming distance for simhash), secs the seconds of each stage here. own: bool mask of the
    documents this process is responsible for; MinHash components without one of them are skipped. hub: the
    Redis exchange (None in one process): share_texts(positions) before verifying, merge(code) after MinHash."""
    n = len(a["filter"])
    code = np.where(a["filter"] > 0, 1, 0).astype(np.int8)
    partner, score, secs = np.full(n, -1, np.int64), np.zeros(n, np.float32), {}
    if "exact" in walk:
        with _timed(secs, "exact"):
            p = dedup.first_of_equal(a["exact"], code == 0)
            code[p >= 0], partner[p >= 0] = 2, p[p >= 0]
    if "minhash" in walk:
        with _timed(secs, "minhash"):
            label, linked = dedup.candidate_components(a["bands"], (code == 0) & ~a["empty"])
            members, bounds = dedup.component_groups(label, np.nonzero(linked)[0])
            mine = np.add.reduceat(own[members], bounds[:-1]) > 0 if len(members) else np.zeros(0, bool)
            sizes = np.diff(bounds)[mine]
            members, bounds = members[np.repeat(mine, np.diff(bounds))], np.concatenate([[0], np.cumsum(sizes)])
            if hub is not None:
                hub.share_texts(members, bounds)
            tasks = ((lo, (a["bands"][members[lo:hi]], texts_at(members[lo:hi]), rel, c.threshold, c.ngram))
                     for lo, hi, rel in _batches(members, bounds, 4000))
            for lo, removed in _bounded(pool, _resolve_batch, tasks, 2 * max(1, c.num_workers)):
                for j, i, jac in removed:
                    code[members[lo + j]], partner[members[lo + j]], score[members[lo + j]] = 3, members[lo + i], jac
        if hub is not None:
            code = hub.merge(code)
    if "simhash" in walk:
        with _timed(secs, "simhash"):
            i, j = dedup.simhash_pairs(a["simhash"], (code == 0) & ~a["empty"], c.simhash_k)
            p = dedup.greedy_partners(i, j, n)
            hit = p >= 0
            code[hit], partner[hit] = 4, p[hit]
            score[hit] = dedup.popcount64(a["simhash"][hit] ^ a["simhash"][p[hit]])
    return code, partner, score, secs


class RedisHub:
    """The Redis side of _decide for shard `shard` of a multi-shard run (phases in clean_data/shards.py)."""

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
        shards.publish_texts(self.r, self.c.redis_prefix, out, self.local_texts(out - self.lo))
        shards.barrier(self.r, self.c.redis_prefix, "texts", self.c.shard_id, self.c.num_shards, self.c.redis_timeout)

    def texts_at(self, positions):
        mine = self.is_mine(positions)
        out = np.empty(len(positions), object)
        out[mine] = self.local_texts(positions[mine] - self.lo)
        out[~mine] = shards.fetch_texts(self.r, self.c.redis_prefix, positions[~mine])
        return out.tolist()

    def merge(self, code):
        """Every shard's verdicts for its own documents, after MinHash."""
        p = self.c.redis_prefix
        shards.publish(self.r, p, "minhash", self.c.shard_id, {"code": code[self.lo:self.hi]})
        shards.barrier(self.r, p, "minhash", self.c.shard_id, self.c.num_shards, self.c.redis_timeout)
        return shards.fetch_all(self.r, p, "minhash", self.c.num_shards, ["code"])["code"].copy()


def peak_rss_mb():
    """Peak resident memory of this process and of its (finished) children, in MiB (Linux: KiB units)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(me, 1), round(kids, 1)


def _settings(settings):
    """(c, active, walk, cfg) from clean()'s keyword settings: c all settings with defaults filled in, active
    the stages given, walk them in pipeline order, cfg what the worker processes need. TypeError naming an
    unknown setting; ValueError for an unknown stage, bands that do not divide num_perm, num_shards > 1
    without redis_url, a shard_id outside [0, num_shards)."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"clean() got unknown setting(s) {unknown}; known: {', '.join(DEFAULTS)}")
    c = SimpleNamespace(**{**DEFAULTS, **settings})
    active = [s.strip() for s in c.stages.split(",") if s.strip()] if isinstance(c.stages, str) else list(c.stages)
    unknown = set(active) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    if c.bands < 1 or c.num_perm % c.bands:
        raise ValueError(f"bands={c.bands} must divide num_perm={c.num_perm}")
    if c.num_shards > 1 and not c.redis_url:
        raise ValueError(f"num_shards={c.num_shards} needs redis_url (the shards exchange their arrays there)")
    if c.redis_url and not 0 <= c.shard_id < c.num_shards:
        raise ValueError(f"shard_id={c.shard_id} must be in [0, num_shards={c.num_shards})")
    walk = [s for s in STAGES if s in active]  # always in this order, whatever the order given
    cfg = dict(stages=active, t2s=c.t2s, ngram=c.ngram, num_perm=c.num_perm, bands=c.bands,
               minhash_seed=c.minhash_seed, filters={k: getattr(c, k) for k in filters.DEFAULTS})
    return c, active, walk, cfg


def _pool(c, cfg):
    """num_workers processes set up with cfg, or None (cfg set up in this process) when num_workers <= 1."""
    if c.num_workers > 1:
        return Pool(c.num_workers, initializer=_init, initargs=(cfg,))
    _init(cfg)


def verdicts(texts, **settings):
    """The pipeline's verdicts on in-memory texts, nothing written (tests, benchmarks): (code, partner, score)
    as _decide returns them, positions = indices into texts. settings as for clean(); num_workers > 1 uses
    a pool."""
    c, active, walk, cfg = _settings(settings)
    pool = _pool(c, cfg)
    try:
        chunks = ((None, texts[i:i + c.chunk_docs]) for i in range(0, len(texts), c.chunk_docs))
        parts = {}
        for _, analysis in _bounded(pool, _analyse, chunks, 2 * max(1, c.num_workers)):
            analysis.pop("secs")
            for k, v in analysis.items():
                parts.setdefault(k, []).append(v)
        norm = b"".join(parts.pop("norm", []))
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        offsets = np.concatenate([[0], np.cumsum(arrays.pop("norm_len"))]) if "norm_len" in arrays else None
        code, partner, score, _ = _decide(arrays, c, walk, pool, _text_reader(norm, offsets),
                                          np.ones(len(texts), bool))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return code, partner, score


# ---- the pipeline -------------------------------------------------------------------------------------

def clean(input, out_dir, progress=True, **settings):
    """Run the pipeline on input (comma-separated files / directories / globs, or a list of them) into
    out_dir; returns the report dict (also written to out_dir/report.json). settings: any of the
    hyperparameter globals at the top of this file by name (stages, min_chars, num_workers, ...); the ones
    not given keep those values.

    Everything about the input is checked before out_dir is created or any file opened: raises TypeError
    naming any other setting, ValueError for an unknown stage, bands that do not divide num_perm, a shard_id
    outside [0, num_shards), num_shards > 1 without redis_url, or an input file of an unsupported type,
    FileNotFoundError for an input path that does not exist, EmptyInputError (a ValueError) naming the input
    when it holds no file or no document. The outputs are written under temporary names and renamed together
    at the end, so on any error the files already in out_dir stay byte-identical and no temporary file is
    left behind (scratch files live in a temporary folder inside out_dir, removed at the end)."""
    t_start = time.time()
    c, active, walk, cfg = _settings(settings)
    inputs = [p for p in input.split(",") if p] if isinstance(input, str) else list(input)
    errors = ReadErrors()
    files = input_files(inputs, errors)  # a typo'd path raises here, before anything is created
    docs = iter(read_files(files, text_field=c.text_field or None, errors=errors, txt_mode=c.txt_mode))
    first = next(docs, None)  # files that hold no document (empty, all malformed) are refused before writing
    if first is None:
        raise EmptyInputError(f"no documents in input {', '.join(map(str, inputs))}: {errors.brief()}")
    docs = itertools.chain([first], docs)
    hub_redis = shards.connect(c.redis_url) if c.redis_url else None
    if hub_redis is not None:
        shards.claim(hub_redis, c.redis_prefix, c.shard_id)

    secs = {"read": 0.0, **{s: 0.0 for s in STAGES}, "write": 0.0}
    os.makedirs(out_dir, exist_ok=True)
    # one ExitStack for the outputs: leaving it on an error removes every temporary file, replaces none
    with ExitStack() as outputs:
        def staged(name):
            return outputs.enter_context(atomic_path(os.path.join(out_dir, name)))

        report_path = staged("report.json")  # entered first, so renamed last: a new report means new outputs
        scratch = tempfile.mkdtemp(prefix=".scratch-", dir=out_dir)
        outputs.callback(shutil.rmtree, scratch, ignore_errors=True)
        pool = _pool(c, cfg)
        if pool is not None:
            outputs.callback(pool.join)
            outputs.callback(pool.close)
        local, n_read, chars_in = _stream(docs, c, pool, scratch, secs, progress)
        offsets = np.concatenate([[0], np.cumsum(local.pop("norm_len"))]) if "norm_len" in local else None
        local_texts = None
        if offsets is not None:
            fd = os.open(os.path.join(scratch, "norm.bin"), os.O_RDONLY)
            outputs.callback(os.close, fd)
            local_texts = _file_text_reader(fd, offsets)
        rss_by_pass = {"stream": peak_rss_mb()[0]}

        # pass 2: the verdicts, over this shard's arrays or (Redis) all shards'
        t = time.perf_counter()
        if hub_redis is None:
            arrays, starts, ids = local, np.array([0, n_read]), [c.shard_id]
            own, hub, texts_at = np.ones(n_read, bool), None, local_texts
        else:
            shards.publish(hub_redis, c.redis_prefix, "keys", c.shard_id, local)
            shards.barrier(hub_redis, c.redis_prefix, "keys", c.shard_id, c.num_shards, c.redis_timeout)
            counts = [int(shards.fetch(hub_redis, c.redis_prefix, "keys", s, "filter").shape[0])
                      for s in range(c.num_shards)]
            starts, ids = np.concatenate([[0], np.cumsum(counts)]), list(range(c.num_shards))
            arrays = shards.fetch_all(hub_redis, c.redis_prefix, "keys", c.num_shards, list(local))
            del local
            hub = RedisHub(hub_redis, c, starts, local_texts)
            own, texts_at = hub.is_mine(np.arange(starts[-1])), hub.texts_at
        secs["exchange"] = time.perf_counter() - t
        bytes_per_doc = sum(v.nbytes for v in arrays.values()) / max(len(arrays["filter"]), 1)
        code, partner, score, decide_secs = _decide(arrays, c, walk, pool, texts_at, own, hub)
        if pool is not None:  # done with the workers: joined now, their peak RSS reaches the report
            pool.close()
            pool.join()
        for k, v in decide_secs.items():
            secs[k] += v
        rss_by_pass["decide"] = peak_rss_mb()[0]
        lo = int(starts[ids.index(c.shard_id)])
        gid = _global_ids(starts, ids)

        # pass 3: the kept rows to clean.parquet, the others to removed.jsonl
        t = time.perf_counter()
        sink = ParquetSink(staged("clean.parquet"), c.row_group_size)
        outputs.callback(sink.writer.close)  # on an error: closed before its temporary file is removed
        removed_f = outputs.enter_context(open(staged("removed.jsonl"), "w", encoding="utf-8")) \
            if c.write_removed else None
        chars_out = _write(os.path.join(scratch, "docs.parquet"), sink, removed_f, code[lo:lo + n_read],
                           arrays["filter"][lo:lo + n_read], partner[lo:lo + n_read], score[lo:lo + n_read],
                           lo, gid)
        sink.close()
        secs["write"] += time.perf_counter() - t
        mine = slice(lo, lo + n_read)
        per_stage = _stage_counts(walk, code[mine], arrays["filter"][mine],
                                  arrays["empty"][mine] if "empty" in arrays else np.zeros(n_read, bool), secs)
        rss_self, rss_children = peak_rss_mb()
        wall = time.time() - t_start
        report = {
            "input": inputs, "output": os.path.join(out_dir, "clean.parquet"), "documents_in": n_read,
            "documents_out": sink.n, "chars_in": chars_in, "chars_out": chars_out, "stages": per_stage,
            "seconds": {"wall": round(wall, 2), "read": round(secs["read"], 2), "write": round(secs["write"], 2),
                        "exchange": round(secs["exchange"], 2)},
            "docs_per_s_wall": round(n_read / wall) if wall > 0 else None,
            "peak_rss_mb": {"main": rss_self, "largest_worker": rss_children},
            "peak_rss_mb_main_after": {**rss_by_pass, "write": rss_self},
            "bytes_per_document": round(bytes_per_doc, 1),
            "read_errors": errors.to_dict(),
            "config": dict(stages=active, t2s=c.t2s, ngram=c.ngram, num_perm=c.num_perm, bands=c.bands,
                           threshold=c.threshold, simhash_k=c.simhash_k, num_workers=c.num_workers,
                           chunk_docs=c.chunk_docs, redis=bool(c.redis_url), shard_id=c.shard_id,
                           num_shards=c.num_shards, **cfg["filters"]),
        }
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
    if hub_redis is not None:
        reports = shards.finish(hub_redis, c.redis_prefix, c.shard_id, c.num_shards, report)
        if reports is not None:
            with atomic_path(os.path.join(out_dir, "report_all.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(combine_reports(reports), f, ensure_ascii=False, indent=1)
    return report


def _stream(docs, c, pool, scratch, secs, progress):
    """Pass 1: every document to scratch/docs.parquet, its normalised text to scratch/norm.bin, the numbers of
    _analyse to arrays. Returns (arrays: name -> concatenated numpy array, documents read, characters read)."""
    n_read = chars_in = 0
    parts = {}
    sink = ParquetSink(os.path.join(scratch, "docs.parquet"), c.row_group_size)
    bar = tqdm(desc="clean", unit="doc", disable=not progress, smoothing=0.05,
               mininterval=0.5 if sys.stderr.isatty() else 30)

    def timed_chunks():  # reading time is what the reader spends between chunks
        nonlocal n_read, chars_in
        it = _chunks(docs, max(1, c.chunk_docs))
        while True:
            t = time.perf_counter()
            chunk = next(it, None)
            secs["read"] += time.perf_counter() - t
            if chunk is None:
                return
            n_read += len(chunk)
            chars_in += sum(len(d["text"]) for d in chunk)
            yield chunk, [d["text"] for d in chunk]

    try:
        with open(os.path.join(scratch, "norm.bin"), "wb") as norm_f:
            for chunk, analysis in _bounded(pool, _analyse, timed_chunks(), 2 * max(1, c.num_workers)):
                for k, v in analysis.pop("secs").items():
                    secs[k] += v
                if "norm" in analysis:
                    norm_f.write(analysis.pop("norm"))
                for k, v in analysis.items():
                    parts.setdefault(k, []).append(v)
                t = time.perf_counter()
                for d in chunk:
                    sink.add(d)
                secs["write"] += time.perf_counter() - t
                bar.update(len(chunk))
    finally:
        bar.close()
        sink.close()
    return {k: np.concatenate(v) for k, v in parts.items()}, n_read, chars_in


def _global_ids(starts, ids):
    """A function: global positions (int array) -> document ids shard_id * ID_STRIDE + running number in the
    shard (int64 array)."""
    starts = np.asarray(starts)
    ids = np.asarray(ids, np.int64)

    def gid(pos):
        s = np.searchsorted(starts, pos, side="right") - 1
        return ids[s] * ID_STRIDE + (pos - starts[s])
    return gid


def _write(scratch_parquet, sink, removed_f, code, filt, partner, score, lo, gid):
    """Pass 3: rows of the scratch parquet with code 0 to sink, the others (when removed_f) as JSON lines with
    stage, reason, doc id, source, line, text and, for duplicates, dup_of and jaccard / distance. Arrays are
    this shard's slices; lo its first global position. Returns the characters kept."""
    chars_out, at = 0, 0
    for batch in parquet_file(scratch_parquet).iter_batches(batch_size=sink.row_group_size):
        n = batch.num_rows
        keep = code[at:at + n] == 0
        table = batch.filter(keep)
        sink.add_table(sink.pa.Table.from_batches([table], schema=sink.schema))
        chars_out += pc.sum(pc.utf8_length(table.column("text"))).as_py() or 0
        if removed_f is not None:
            gone = np.nonzero(~keep)[0]
            rows = batch.take(gone).select(["text", "source", "line"]).to_pylist()
            doc_ids, dup_ids = gid(lo + at + gone).tolist(), gid(np.maximum(partner[at + gone], 0)).tolist()
            for j, rec, doc_id, dup_id in zip(gone.tolist(), rows, doc_ids, dup_ids):
                p = at + j
                stage = STAGES[code[p] - 1]
                out = {"stage": stage, "reason": filters.FILTER_NAMES[filt[p] - 1] if stage == "filter"
                       else DUP_REASON[stage], "doc": doc_id, "source": rec["source"],
                       "line": rec["line"], "text": rec["text"]}
                if partner[p] >= 0:
                    out["dup_of"] = dup_id
                    if stage != "exact":
                        out["jaccard" if stage == "minhash" else "distance"] = round(float(score[p]), 4)
                removed_f.write(json.dumps(out, ensure_ascii=False) + "\n")
        at += n
    return chars_out


def _stage_counts(walk, code, filt, empty, secs):
    """Per stage: documents in / out / removed (by reason), seconds and docs/s, for this shard's documents."""
    out, alive = {}, np.ones(len(code), bool)
    for k, s in enumerate(walk):
        stage_code = 1 + STAGES.index(s)
        entering = alive & ~empty if s in ("minhash", "simhash") else alive
        gone = code == stage_code
        if s == "filter":
            by = {filters.FILTER_NAMES[r - 1]: int(n) for r, n in zip(*np.unique(filt[gone], return_counts=True))}
        else:
            by = {DUP_REASON[s]: int(gone.sum())} if gone.any() else {}
        n_in, n_gone = int(entering.sum()), int(gone.sum())
        out[s] = {"in": n_in, "out": n_in - n_gone, "removed": n_gone, "removed_by": by,
                  "seconds": round(secs[s], 3), "docs_per_s": round(n_in / secs[s]) if secs[s] > 0 else None}
        alive &= ~gone
    return out


def combine_reports(reports):
    """The shards' reports as one: documents and characters summed, stage counts and seconds summed, the
    largest peak RSS; shards: the shard reports themselves."""
    first = reports[0]
    out = {k: sum(r[k] for r in reports) for k in ("documents_in", "documents_out", "chars_in", "chars_out")}
    stages = {}
    for s in first["stages"]:
        v = {k: sum(r["stages"][s][k] for r in reports) for k in ("in", "out", "removed", "seconds")}
        v["removed_by"] = {}
        for r in reports:
            for reason, n in r["stages"][s]["removed_by"].items():
                v["removed_by"][reason] = v["removed_by"].get(reason, 0) + n
        stages[s] = v
    out["stages"] = stages
    out["peak_rss_mb_max"] = max(max(r["peak_rss_mb"].values()) for r in reports)
    out["wall_seconds_max"] = max(r["seconds"]["wall"] for r in reports)
    out["shards"] = reports
    return out


def format_report(r):
    """The report dict clean() returns as the lines the command prints (no trailing newline)."""
    lines = [f"documents {r['documents_in']:,} -> {r['documents_out']:,}, characters {r['chars_in']:,} -> "
             f"{r['chars_out']:,}, {r['seconds']['wall']} s ({r['docs_per_s_wall']:,} docs/s)"]
    for s, v in r["stages"].items():
        lines.append(f"  {s:8s} in {v['in']:>9,}  removed {v['removed']:>8,}  {v['seconds']:7.1f} s  "
                     f"{v['docs_per_s'] or 0:>9,} docs/s  {v['removed_by']}")
    rss = r["peak_rss_mb"]
    lines.append(f"  peak RSS: main {rss['main']} MiB, largest worker {rss['largest_worker']} MiB; "
                 f"{r['bytes_per_document']} bytes of arrays per document")
    e = r["read_errors"]
    if e["malformed_records"]:
        lines.append(f"  malformed records skipped: {e['malformed_records']} {e['malformed_by_reason']}")
    if r["documents_out"] == 0:
        lines.append(f"  WARNING: every document was removed: {r['output']} has no rows")
    lines.append(f"  -> {r['output']}")
    return "\n".join(lines)


def main():
    """python -m clean_data: clean with the globals above, as the command line set them (clean_data/__main__.py)."""
    settings = {k: globals()[k] for k in DEFAULTS}  # the hyperparameters, as overridden
    try:
        report = clean(input, out_dir, **settings)
    except (OSError, ValueError) as e:  # a missing, empty or unsupported input: say which, no traceback
        sys.exit(f"error: {e}")
    print(format_report(report))
