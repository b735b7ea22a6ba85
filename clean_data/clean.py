"""
Clean a corpus: read -> quality filters -> exact dedup -> MinHash near-dup -> SimHash near-dup -> parquet.

    python -m clean_data --input=data/chinese-poetry --out_dir=out/clean/poetry
    python -m clean_data --input=a.jsonl,b/ --stages=filter,exact          # any subset, in this order
    python -m clean_data --input=out/clean/poetry/clean.parquet --stages=simhash --simhash_k=4
    python -m clean_data --input=shard1/ --redis_url=redis://10.0.0.5:6379/0 --shard_id=1   # shared index

From Python, the same settings by name (the globals below are the defaults):

    from clean_data.clean import clean
    report = clean("data/chinese-poetry", "out/clean/poetry", stages="filter,exact", num_workers=4)

Writes out_dir/clean.parquet (text, source, line, title, author, collection, id; zstd, row groups),
out_dir/report.json (documents in/out per stage, removals per filter, seconds and docs/s per stage, peak
RSS, read errors) and, with write_removed, out_dir/removed.jsonl (every removed document and its reason;
for duplicates, dup_of = the running number of the kept document it duplicates). The input is checked before
out_dir is touched (a path that does not exist, an unsupported file, no file or no document at all: an error
naming the input, exit status 1 from the command line); the outputs are written under temporary names and
renamed at the end, so a failed run leaves the files of the last good one byte-identical.

One streaming pass, memory bounded by the indexes: documents are read in chunks of chunk_docs; a pool
of num_workers processes normalises, filters and computes exact keys, MinHash signatures and SimHash
fingerprints for a chunk (the parallel, numeric part); this process then walks the chunk in order
through the indexes (exact set, MinHashLSH, SimhashIndex: the sequential part, "first one wins") and
appends the survivors to the parquet file. Texts are never kept beyond their chunk.

With redis_url, the exact-key set and the MinHash LSH index (datasketch storage_config type "redis") and
the kept signatures live in one Redis server under redis_prefix, so several processes or machines can
clean shards of one corpus against one index (give each a different shard_id so document ids differ).
Documents in flight at the same moment on two workers can both survive; SimHash stays per process.
"""
import itertools
import json
import os
import resource
import sys
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from multiprocessing import Pool
from types import SimpleNamespace

from tqdm import tqdm

from clean_data import dedup, filters
from clean_data.atomic import atomic_path
from clean_data.normalize import normalize
from clean_data.readers import EmptyInputError, ReadErrors, input_files, read_files
from configurator import config_of

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
num_perm = 128
threshold = 0.8  # MinHash: Jaccard at or above which a document is a near-duplicate
lsh_threshold = 0.65  # LSH banding tuned for this lower Jaccard: more candidates, then checked at threshold
minhash_seed = 1
simhash_k = 3  # SimHash: Hamming distance at or below which a document is a near-duplicate
num_workers = 2  # signature processes; <= 1 computes in this process
chunk_docs = 2000
row_group_size = 50_000
write_removed = True
redis_url = ""  # e.g. redis://localhost:6379/0: exact + MinHash indexes shared through Redis
redis_prefix = "babyllama"
shard_id = 0  # document ids are shard_id * 10**12 + running number
# -----------------------------------------------------------------------------
# the settings clean() takes by name, with their defaults: every hyperparameter above but the two paths
DEFAULTS = {k: v for k, v in config_of(globals()).items() if k not in ("input", "out_dir")}

STAGES = ("filter", "exact", "minhash", "simhash")
DUP_REASON = {"exact": "exact_dup", "minhash": "near_dup", "simhash": "near_dup"}
META_COLUMNS = ("line", "title", "author", "collection", "id")


# ---- per chunk, in worker processes ---------------------------------------------------------------------

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
    """The parallel part for one chunk. Returns a dict: "filter" the filter reason per text (None = passes),
    "exact" / "minhash" / "simhash" the key per text that stage's index takes (exact key, MinHash signature,
    SimHash fingerprint; only for the active stages), "shingles" the shingle set per text (MinHash candidates
    are verified with them), "empty" whether a text has no shingle once normalised, and "secs" the seconds
    each stage took here (summed over processes in the report)."""
    c, secs = _cfg, {}
    out = {"secs": secs}
    with _timed(secs, "filter"):
        out["filter"] = [filters.check(x, c["filters"]) for x in texts] if "filter" in c["stages"] \
            else [None] * len(texts)
    with _timed(secs, "exact"):
        norms = [normalize(x, c["t2s"]) if r is None else "" for x, r in zip(texts, out["filter"])]
        if "exact" in c["stages"]:
            out["exact"] = [dedup.exact_key(s) for s in norms]
    near = [s for s in ("minhash", "simhash") if s in c["stages"]]
    if near:
        with _timed(secs, "shingles"):
            hashes, counts = dedup.shingle_hashes(norms, c["ngram"])
        if "minhash" in near:
            with _timed(secs, "minhash"):
                out["minhash"] = dedup.minhash_signatures(hashes, counts,
                                                          dedup.permutations(c["num_perm"], c["minhash_seed"]))
                out["shingles"] = dedup.unique_shingles(hashes, counts)
        if "simhash" in near:
            with _timed(secs, "simhash"):
                out["simhash"] = dedup.simhash_fingerprints(hashes, counts)
        shingle_secs = secs.pop("shingles")
        for stage in near:  # each near-duplicate stage needs the shingles: each is charged for them
            secs[stage] += shingle_secs
        out["empty"] = counts == 0  # nothing left after normalisation: no near-dup comparison possible
    return out


def _verdict(stage, index, analysis, j, doc_id):
    """(reason, dup_of) when document j of the analysed chunk is removed at this stage, else (None, None).
    An index stage adds a document it keeps to its index (first one wins)."""
    if stage == "filter":
        return analysis["filter"][j], None
    extra = (analysis["shingles"][j],) if stage == "minhash" else ()
    first = index.check_and_add(analysis[stage][j], doc_id, *extra)
    return (None, None) if first is None else (DUP_REASON[stage], first)


# ---- the pipeline -------------------------------------------------------------------------------------

def _chunks(docs, size):
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ParquetSink:
    """Appends kept documents to one parquet file at path, a row group every row_group_size rows (clean()
    gives it a temporary path, renamed over clean.parquet once the whole run has succeeded)."""

    def __init__(self, path, row_group_size):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.pa = pa
        self.schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("line", pa.int64())] +
                                [(k, pa.string()) for k in META_COLUMNS[1:]])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows, self.row_group_size, self.n = [], row_group_size, 0

    def add(self, doc):
        self.rows.append(doc)
        if len(self.rows) >= self.row_group_size:
            self.flush()

    def flush(self):
        if not self.rows:
            return
        cols = {"text": [d["text"] for d in self.rows], "source": [str(d.get("source", "")) for d in self.rows],
                "line": [d.get("line") for d in self.rows]}
        for k in META_COLUMNS[1:]:
            cols[k] = [None if d.get(k) is None else str(d[k]) for d in self.rows]
        self.writer.write_table(self.pa.Table.from_pydict(cols, schema=self.schema),
                                row_group_size=self.row_group_size)
        self.n += len(self.rows)
        self.rows = []

    def close(self):
        """Write the last rows and the footer (closing twice is harmless: pyarrow's close is idempotent)."""
        self.flush()
        self.writer.close()


def peak_rss_mb():
    """Peak resident memory of this process and of its (finished) children, in MiB (Linux: KiB units)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(me, 1), round(kids, 1)


def clean(input, out_dir, progress=True, **settings):
    """Run the pipeline on input (comma-separated files / directories / globs, or a list of them) into
    out_dir; returns the report dict (also written to out_dir/report.json). settings: any of the
    hyperparameter globals at the top of this file by name (stages, min_chars, num_workers, ...); the ones
    not given keep those values.

    Everything about the input is checked before out_dir is created or any file opened: raises TypeError
    naming any other setting, ValueError for an unknown stage or an input file of an unsupported type,
    FileNotFoundError for an input path that does not exist, EmptyInputError (a ValueError) naming the input
    when it holds no file or no document. The outputs are written under temporary names and renamed together
    at the end, so on any error the files already in out_dir stay byte-identical and no temporary file is
    left behind."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"clean() got unknown setting(s) {unknown}; known: {', '.join(DEFAULTS)}")
    c = SimpleNamespace(**{**DEFAULTS, **settings})
    t_start = time.time()
    active = [s.strip() for s in c.stages.split(",") if s.strip()] if isinstance(c.stages, str) else list(c.stages)
    unknown = set(active) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    walk = [s for s in STAGES if s in active]  # always in this order, whatever the order given
    cfg = dict(stages=active, t2s=c.t2s, ngram=c.ngram, num_perm=c.num_perm, minhash_seed=c.minhash_seed,
               filters={k: getattr(c, k) for k in filters.DEFAULTS})
    inputs = [p for p in input.split(",") if p] if isinstance(input, str) else list(input)
    errors = ReadErrors()
    files = input_files(inputs, errors)  # a typo'd path raises here, before anything is created
    n_read = chars_in = chars_out = 0
    doc_id = c.shard_id * 10 ** 12
    secs = {"read": 0.0, **{s: 0.0 for s in STAGES}, "write": 0.0}

    def timed_docs():  # reading time is what the generator spends between yields
        nonlocal n_read, chars_in, doc_id
        it = iter(read_files(files, text_field=c.text_field or None, errors=errors, txt_mode=c.txt_mode))
        while True:
            t = time.perf_counter()
            doc = next(it, None)
            secs["read"] += time.perf_counter() - t
            if doc is None:
                return
            n_read += 1
            chars_in += len(doc["text"])
            doc["_id"] = doc_id
            doc_id += 1
            yield doc

    docs = timed_docs()
    first = next(docs, None)  # files that hold no document (empty, all malformed) are refused before writing
    if first is None:
        raise EmptyInputError(f"no documents in input {', '.join(map(str, inputs))}: {errors.brief()}")
    docs = itertools.chain([first], docs)

    indexes = {"exact": dedup.ExactDedup(c.redis_url, c.redis_prefix) if "exact" in active else None,
               "minhash": dedup.MinHashDedup(c.threshold, c.num_perm, c.minhash_seed, c.redis_url, c.redis_prefix,
                                             c.lsh_threshold) if "minhash" in active else None,
               "simhash": dedup.SimHashDedup(c.simhash_k) if "simhash" in active else None}
    removed_by = {s: {} for s in STAGES}  # stage -> reason -> count
    stage_in = {s: 0 for s in STAGES}
    parquet_path = os.path.join(out_dir, "clean.parquet")
    os.makedirs(out_dir, exist_ok=True)
    # one ExitStack for the three outputs: leaving it on an error removes every temporary file, replaces none
    with ExitStack() as outputs:
        def staged(name):
            return outputs.enter_context(atomic_path(os.path.join(out_dir, name)))

        report_path = staged("report.json")  # entered first, so renamed last: a new report means new outputs
        sink = ParquetSink(staged("clean.parquet"), c.row_group_size)
        outputs.callback(sink.writer.close)  # on an error: closed before its temporary file is removed
        removed_f = outputs.enter_context(open(staged("removed.jsonl"), "w", encoding="utf-8")) \
            if c.write_removed else None

        def drop(stage, reason, doc, dup_of=None):
            removed_by[stage][reason] = removed_by[stage].get(reason, 0) + 1
            if removed_f is not None:
                rec = {"stage": stage, "reason": reason, "doc": doc["_id"], "source": doc.get("source"),
                       "line": doc.get("line"), "text": doc["text"]}
                if dup_of is not None:
                    rec["dup_of"] = dup_of
                removed_f.write(json.dumps(rec, ensure_ascii=False) + "\n")

        pool = Pool(c.num_workers, initializer=_init, initargs=(cfg,)) if c.num_workers > 1 else None
        if pool is None:
            _init(cfg)
        bar = tqdm(desc="clean", unit="doc", disable=not progress, smoothing=0.05,
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        try:
            chunks = _chunks(docs, max(1, c.chunk_docs))
            for chunk, analysis in _bounded_map(pool, chunks, 2 * max(1, c.num_workers)):
                for k, v in analysis["secs"].items():
                    secs[k] += v
                for j, doc in enumerate(chunk):
                    for stage in walk:
                        if stage in ("minhash", "simhash") and analysis["empty"][j]:
                            continue  # nothing left after normalisation: no near-duplicate comparison possible
                        stage_in[stage] += 1
                        t = time.perf_counter()
                        reason, dup_of = _verdict(stage, indexes.get(stage), analysis, j, doc["_id"])
                        secs[stage] += time.perf_counter() - t
                        if reason is not None:
                            drop(stage, reason, doc, dup_of)
                            break
                    else:  # no stage removed it
                        t = time.perf_counter()
                        chars_out += len(doc["text"])
                        sink.add(doc)
                        secs["write"] += time.perf_counter() - t
                bar.update(len(chunk))
                bar.set_postfix_str(f"{sink.n + len(sink.rows):,} kept", refresh=False)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
        t = time.perf_counter()
        sink.close()
        secs["write"] += time.perf_counter() - t
        wall = time.time() - t_start
        per_stage = {}
        for s in walk:
            n_removed = sum(removed_by[s].values())
            per_stage[s] = {"in": stage_in[s], "out": stage_in[s] - n_removed, "removed": n_removed,
                            "removed_by": removed_by[s], "seconds": round(secs[s], 3),
                            "docs_per_s": round(stage_in[s] / secs[s]) if secs[s] > 0 else None}
        rss_self, rss_children = peak_rss_mb()
        report = {
            "input": inputs, "output": parquet_path, "documents_in": n_read, "documents_out": sink.n,
            "chars_in": chars_in, "chars_out": chars_out, "stages": per_stage,
            "seconds": {"wall": round(wall, 2), "read": round(secs["read"], 2), "write": round(secs["write"], 2)},
            "docs_per_s_wall": round(n_read / wall) if wall > 0 else None,
            "peak_rss_mb": {"main": rss_self, "largest_worker": rss_children},
            "read_errors": errors.to_dict(),
            "config": dict(stages=active, t2s=c.t2s, ngram=c.ngram, num_perm=c.num_perm, threshold=c.threshold,
                           lsh_threshold=c.lsh_threshold, simhash_k=c.simhash_k, num_workers=c.num_workers,
                           chunk_docs=c.chunk_docs, redis=bool(c.redis_url), **cfg["filters"]),
        }
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
    return report


def _bounded_map(pool, chunks, in_flight):
    """(chunk, _analyse(texts of chunk)) in order, with at most in_flight chunks submitted and not yet
    collected. Pool.imap would read the whole input ahead into its task queue: memory bounded by the
    corpus instead of by the indexes."""
    if pool is None:
        for ch in chunks:
            yield ch, _analyse([d["text"] for d in ch])
        return
    pending = deque()
    for ch in chunks:
        pending.append((ch, pool.apply_async(_analyse, ([d["text"] for d in ch],))))
        if len(pending) >= in_flight:
            ch0, res = pending.popleft()
            yield ch0, res.get()
    while pending:
        ch0, res = pending.popleft()
        yield ch0, res.get()


def format_report(r):
    """The report dict clean() returns as the lines the command prints (no trailing newline)."""
    lines = [f"documents {r['documents_in']:,} -> {r['documents_out']:,}, characters {r['chars_in']:,} -> "
             f"{r['chars_out']:,}, {r['seconds']['wall']} s ({r['docs_per_s_wall']:,} docs/s)"]
    for s, v in r["stages"].items():
        lines.append(f"  {s:8s} in {v['in']:>9,}  removed {v['removed']:>8,}  {v['seconds']:7.1f} s  "
                     f"{v['docs_per_s'] or 0:>9,} docs/s  {v['removed_by']}")
    rss = r["peak_rss_mb"]
    lines.append(f"  peak RSS: main {rss['main']} MiB, largest worker {rss['largest_worker']} MiB")
    e = r["read_errors"]
    if e["malformed_records"]:
        lines.append(f"  malformed records skipped: {e['malformed_records']} {e['malformed_by_reason']}")
    if r["documents_out"] == 0:
        lines.append(f"  WARNING: every document was removed: {r['output']} has no rows")
    lines.append(f"  -> {r['output']}")
    return "\n".join(lines)


if __name__ == "__main__":
    from configurator import apply_overrides
    apply_overrides(globals())
    from clean_data import clean as module  # workers unpickle clean_data.clean._analyse, not __main__'s
    settings = {k: globals()[k] for k in DEFAULTS}  # the hyperparameters, as overridden
    try:
        report = module.clean(input, out_dir, **settings)
    except (OSError, ValueError) as e:  # a missing, empty or unsupported input: say which, no traceback
        sys.exit(f"error: {e}")
    print(module.format_report(report))
