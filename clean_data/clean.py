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
1. stream: documents are read in chunks of chunk_docs; a pool of num_workers processes (workers.py)
   normalises, filters and computes exact keys, MinHash band hashes and SimHash fingerprints per chunk;
   this process keeps those numbers (numpy arrays, ~200 bytes a document), appends every document to a
   scratch parquet file and its normalised text to a scratch text file.
2. decide (decide.py; dedup.py states the rule): exact duplicates by sorting keys, MinHash candidates by
   sorting band hashes, union-find components, each verified by exact Jaccard from the texts read back
   (components spread over the pool), SimHash pairs by permuted-table sorting; every verdict in document
   order.
3. write: the scratch parquet is read back in batches, kept rows go to clean.parquet, removed ones to
   removed.jsonl (the report: report.py).

With redis_url and num_shards > 1, each of num_shards processes (any machines) cleans a contiguous part of
the corpus (shard_id 0 the first) and exchanges its arrays through Redis (clean_data/shards.py): the kept
set equals the single process's on the whole corpus, whatever the start order. Each shard writes its own
out_dir; the last to finish adds report_all.json (all shards summed) to its out_dir.
"""
from contextlib import ExitStack
import itertools
import json
import os
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
from clean_data import filters, shards
from clean_data.decide import DUP_REASON, STAGES, decide
from clean_data.report import combine_reports, format_report, peak_rss_mb, stage_counts
from clean_data.workers import analyse, bounded, start_pool

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

META_COLUMNS = ("line", "title", "author", "collection", "id")
ID_STRIDE = 10 ** 12  # document id = shard_id * ID_STRIDE + running number in the shard


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
        pool = start_pool(c, cfg)
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
            hub = shards.RedisHub(hub_redis, c, starts, local_texts)
            own, texts_at = hub.is_mine(np.arange(starts[-1])), hub.texts_at
        secs["exchange"] = time.perf_counter() - t
        bytes_per_doc = sum(v.nbytes for v in arrays.values()) / max(len(arrays["filter"]), 1)
        code, partner, score, decide_secs = decide(arrays, c, walk, pool, texts_at, own, hub)
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
        per_stage = stage_counts(walk, code[mine], arrays["filter"][mine],
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
    analyse to arrays. Returns (arrays: name -> concatenated numpy array, documents read, characters read)."""
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
            for chunk, analysis in bounded(pool, analyse, timed_chunks(), 2 * max(1, c.num_workers)):
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


# ---- settings, scratch files, the in-memory run -----------------------------------------------------------

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


def _chunks(docs, size):
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _text_reader(buf, offsets):
    """positions -> normalised texts from buf (bytes; offsets: (N + 1,) byte offsets into it)."""
    return lambda positions: [buf[offsets[p]:offsets[p + 1]].decode("utf-8") for p in positions.tolist()]


def _file_text_reader(fd, offsets):
    """positions -> normalised texts read back from the scratch text file open as fd. pread, not mmap: the
    pages an mmap touches count in this process' RSS."""
    return lambda positions: [os.pread(fd, int(offsets[p + 1] - offsets[p]), int(offsets[p])).decode("utf-8")
                              for p in positions.tolist()]


def verdicts(texts, **settings):
    """The pipeline's verdicts on in-memory texts, nothing written (tests, benchmarks): (code, partner, score)
    as decide returns them, positions = indices into texts. settings as for clean(); num_workers > 1 uses
    a pool."""
    c, active, walk, cfg = _settings(settings)
    pool = start_pool(c, cfg)
    try:
        chunks = ((None, texts[i:i + c.chunk_docs]) for i in range(0, len(texts), c.chunk_docs))
        parts = {}
        for _, analysis in bounded(pool, analyse, chunks, 2 * max(1, c.num_workers)):
            analysis.pop("secs")
            for k, v in analysis.items():
                parts.setdefault(k, []).append(v)
        norm = b"".join(parts.pop("norm", []))
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        offsets = np.concatenate([[0], np.cumsum(arrays.pop("norm_len"))]) if "norm_len" in arrays else None
        code, partner, score, _ = decide(arrays, c, walk, pool, _text_reader(norm, offsets),
                                          np.ones(len(texts), bool))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return code, partner, score


def main():
    """python -m clean_data: clean with the globals above, as the command line set them (clean_data/__main__.py)."""
    settings = {k: globals()[k] for k in DEFAULTS}  # the hyperparameters, as overridden
    try:
        report = clean(input, out_dir, **settings)
    except (OSError, ValueError) as e:  # a missing, empty or unsupported input: say which, no traceback
        sys.exit(f"error: {e}")
    print(format_report(report))
