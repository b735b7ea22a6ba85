"""data_process.py on a small mixed-format corpus (jsonl, json, parquet, txt, a chinese-poetry file) tokenized with
the tiny tokenizer (uint16 ids; with a 70,000-piece one, uint32 ids equal to sentencepiece's): documents decode back
separated by eos, bad records and short documents are counted and named, the split does not depend on the workers,
meta.json says what was written (an empty val.bin named), clean_data's parquet is read back, --download stops after
the corpus, and a missing or empty input is a clear error that leaves existing outputs byte-identical."""
import collections
import json
import os
import re
import subprocess
import sys

from conftest import ENV, POETRY_RECORDS, POETRY_TEXTS, ROOT, snapshot, wide_tokenizer, write_documents
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from babyllama import token_files
from babyllama.readers import EmptyInputError
from clean_data.clean import clean
import data_process

MIN_CHARS = 5

JSONL_DOCS = ["床前明月光，疑是地上霜。", "  leading and trailing spaces kept  ", "two\nlines in one document"]
JSON_DOCS = ["白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "The quick brown fox jumps over the lazy dog."]
PARQUET_DOCS = ["春眠不觉晓，处处闻啼鸟。", "A parquet row with a completion column."]
TXT_DOCS = ["红豆生南国，春来发几枝。", "plain text line number two"]
SHORT_DOCS = ["短", "abcd", "   ok   "]  # fewer than MIN_CHARS characters once stripped
EXPECTED = JSONL_DOCS + JSON_DOCS + PARQUET_DOCS + TXT_DOCS + POETRY_TEXTS


def write_corpus(d):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "a.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": JSONL_DOCS[0], "id": 1}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": SHORT_DOCS[0]}, ensure_ascii=False) + "\n")
        f.write('{"text": "broken line, missing the closing brace"\n')  # line 3: malformed
        f.write("\n")  # blank line: not a record
        f.write(json.dumps({"text": JSONL_DOCS[1]}) + "\n")
        f.write(json.dumps({"text": JSONL_DOCS[2]}) + "\n")
    with open(d / "b.json", "w", encoding="utf-8") as f:
        json.dump([{"content": t} for t in JSON_DOCS] + [{"content": SHORT_DOCS[1]}], f, ensure_ascii=False, indent=1)
    sub = d / "sub"
    sub.mkdir(exist_ok=True)
    pq.write_table(pa.table({"completion": PARQUET_DOCS, "n": [1, 2]}), sub / "c.parquet")
    with open(sub / "d.txt", "w", encoding="utf-8") as f:
        f.write(TXT_DOCS[0] + "\n\n" + TXT_DOCS[1] + "\n" + SHORT_DOCS[2] + "\n")
    with open(d / "poems.json", "w", encoding="utf-8") as f:
        json.dump(POETRY_RECORDS, f, ensure_ascii=False, indent=2)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run(corpus, tok, out, **kw):
    args = dict(text_field="", val_fraction=0.3, min_chars=MIN_CHARS, num_workers=2, chunk_docs=2, seed=1337,
                progress=False, verbose=False)
    args.update(kw)
    return data_process.process(str(corpus), tok.model_path, str(out), **args)


@pytest.fixture(scope="module")
def result(corpus, tiny_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    meta = run(corpus, tiny_tok, out)
    return out, meta


def load_tokens(out):
    return {s: np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")}


def split_docs(ids, eos):
    """Token array -> list of documents' ids; checks every document ends with eos."""
    assert len(ids) == 0 or ids[-1] == eos, "the last document is not followed by eos"
    cuts = np.flatnonzero(ids == eos)
    docs, start = [], 0
    for c in cuts:
        docs.append(ids[start:c])
        start = c + 1
    return docs


def test_bin_decodes_back_to_documents_separated_by_eos(result, tiny_tok):
    out, meta = result
    toks = load_tokens(out)
    assert len(toks["train"]) > 0 and len(toks["val"]) > 0  # val_fraction=0.3 puts some on each side
    decoded = []
    for s in ("train", "val"):
        docs = split_docs(toks[s], tiny_tok.eos_id)
        assert len(docs) == meta[f"{s}_documents"]
        decoded += [tiny_tok.decode(d.tolist()) for d in docs]
    assert collections.Counter(decoded) == collections.Counter(EXPECTED)
    assert not set(SHORT_DOCS) & set(decoded)
    # each document's tokens are exactly its encoding followed by eos (no bos)
    train_docs = split_docs(toks["train"], tiny_tok.eos_id)
    first = tiny_tok.decode(train_docs[0].tolist())
    assert toks["train"][:len(train_docs[0]) + 1].tolist() == tiny_tok.encode(first, eos=True)


def test_malformed_json_line_skipped_counted_and_named(result, capsys):
    out, meta = result
    assert meta["malformed_by_reason"]["bad json"] == 1
    assert any(ex.startswith("a.jsonl:3: bad json") for ex in meta["malformed_examples"]), meta["malformed_examples"]
    # the poem without paragraphs is counted too, not silently lost
    assert meta["malformed_by_reason"]["empty paragraphs"] == 1
    assert meta["malformed_records"] == 2
    report = data_process.format_report(meta)
    assert "a.jsonl:3: bad json" in report


def test_empty_input_is_clear_error(tmp_path, tiny_tok):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data_process.EmptyInputError, match="empty"):
        run(empty, tiny_tok, tmp_path / "out1")
    only_short = tmp_path / "short"
    only_short.mkdir()
    (only_short / "s.txt").write_text("ab\ncd\n", encoding="utf-8")
    with pytest.raises(data_process.EmptyInputError, match="2 shorter than min_chars"):
        run(only_short, tiny_tok, tmp_path / "out2")
    with pytest.raises(data_process.EmptyInputError, match="nomatch"):
        run(str(tmp_path / "nomatch*.jsonl"), tiny_tok, tmp_path / "out3")
    with pytest.raises(FileNotFoundError, match="missing"):
        run(tmp_path / "missing", tiny_tok, tmp_path / "out4")
    for name in ("out1", "out2", "out3", "out4"):  # no empty or half-written files left behind
        d = tmp_path / name
        assert not d.exists() or os.listdir(d) == []


def test_short_documents_dropped_and_counted(result):
    out, meta = result
    assert meta["dropped_short"] == len(SHORT_DOCS)
    assert meta["min_chars"] == MIN_CHARS
    assert meta["documents_read"] == len(EXPECTED) + len(SHORT_DOCS)
    assert meta["train_documents"] + meta["val_documents"] == len(EXPECTED)


def test_download_fetches_the_corpus_and_stops(tmp_path):
    """--download=poetry is the corpus step alone (make download): nothing tokenized, no tokenizer needed. The
    package already extracted under ./data is kept without npm."""
    pkg = tmp_path / "data" / "chinese-poetry"
    pkg.mkdir(parents=True)
    (pkg / "package.json").write_text('{"name": "chinese-poetry", "version": "2.0.1"}')
    script = os.path.join(ROOT, "data_process.py")
    p = subprocess.run([sys.executable, script, "--download=poetry"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == f"chinese-poetry package at {os.path.join('data', 'chinese-poetry')}"
    assert sorted(os.listdir(tmp_path)) == ["data"]
    p = subprocess.run([sys.executable, script, "--download=wiki"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "'poetry' (the chinese-poetry npm package) or 'zh'" in p.stderr


def test_val_split_does_not_depend_on_worker_count(corpus, tiny_tok, tmp_path):
    run(corpus, tiny_tok, tmp_path / "w1", num_workers=1, chunk_docs=3)
    run(corpus, tiny_tok, tmp_path / "w2", num_workers=2, chunk_docs=2)
    for name in ("train.bin", "val.bin"):
        a = (tmp_path / "w1" / name).read_bytes()
        b = (tmp_path / "w2" / name).read_bytes()
        assert a == b and len(a) > 0
    # the split is a function of the text and the seed alone
    assert data_process.is_val("同一首诗", 0.5, 1) == data_process.is_val("同一首诗", 0.5, 1)
    assert not data_process.is_val("anything", 0.0, 1337)
    frac = np.mean([data_process.is_val(f"doc {i}", 0.1, 1337) for i in range(5000)])
    assert 0.08 < frac < 0.12


def test_meta_json_fields(result, tiny_tok, corpus):
    out, meta = result
    with open(out / "meta.json", encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk == meta
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no *.tmp left
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer_model"] == tiny_tok.model_path
    assert meta["tokenizer_sha256"] == tiny_tok.sha256()
    assert meta["vocab_size"] == tiny_tok.vocab_size and meta["eos_id"] == tiny_tok.eos_id
    for s in ("train", "val"):
        assert os.path.getsize(out / f"{s}.bin") == 2 * meta[f"{s}_tokens"]
    assert meta["files_read"] == 5
    assert meta["malformed_records"] == 2
    folders = meta["sources"]["documents_per_folder"]
    assert folders == {".": len(JSONL_DOCS) + len(JSON_DOCS) + len(POETRY_TEXTS),
                       "sub": len(PARQUET_DOCS) + len(TXT_DOCS)}
    assert meta["sources"]["documents_per_source_top"]["poems.json"] == len(POETRY_TEXTS)
    assert meta["input"] == [str(corpus)]
    assert meta["seconds"] >= 0 and meta["seed"] == 1337 and meta["val_fraction"] == 0.3


def test_a_vocabulary_over_uint16_is_written_as_uint32_with_sentencepieces_ids(corpus, tmp_path):
    wide = wide_tokenizer(tmp_path)  # 70,000 pieces: every text piece's id is above 65,535
    out = tmp_path / "out"
    meta = run(corpus, wide, out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    sp = spm.SentencePieceProcessor(model_file=wide.model_path)  # the reference ids
    for s in ("train", "val"):
        assert os.path.getsize(out / f"{s}.bin") == 4 * meta[f"{s}_tokens"] > 0
        ids = np.fromfile(out / f"{s}.bin", dtype=np.uint32)
        docs = [d for d in EXPECTED if data_process.is_val(d, 0.3, 1337) == (s == "val")]
        assert collections.Counter(tuple(d.tolist()) for d in split_docs(ids, sp.eos_id())) == \
            collections.Counter(tuple(sp.encode(d)) for d in docs)
        assert ids.max() > 65_535
        bins, _, _ = token_files.open_bins(str(out / f"{s}.bin"))  # every reader follows meta.json's dtype
        assert bins[0].dtype == np.uint32 and np.array_equal(bins[0], ids)


def test_data_process_reads_what_clean_data_writes(tmp_path, tiny_tok):
    report = clean(str(write_documents(tmp_path / "in")), str(tmp_path / "clean"), num_workers=1, progress=False)
    meta = run(tmp_path / "clean" / "clean.parquet", tiny_tok, tmp_path / "tok", num_workers=1, val_fraction=0.0)
    assert meta["documents_read"] == report["documents_out"]  # every cleaned row read back as a document
    assert meta["train_documents"] == report["documents_out"]
    assert os.path.getsize(tmp_path / "tok" / "train.bin") > 0


def test_data_process_meta_names_an_empty_val_file_and_the_warning_names_it(tmp_path, tiny_tok):
    out = tmp_path / "out"
    # 3 documents: none falls under val_fraction
    meta = run(write_documents(tmp_path / "in", 3), tiny_tok, out, num_workers=1, val_fraction=1e-9)
    assert os.path.getsize(out / "val.bin") == 0  # still written: the format does not change
    on_disk = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert on_disk["empty_files"] == ["val.bin"]
    assert on_disk["tokens_per_file"] == {"train.bin": os.path.getsize(out / "train.bin") // 2, "val.bin": 0}
    report = data_process.format_report(meta, str(out))
    assert f"WARNING: {out / 'val.bin'} is empty (0 tokens)" in report
    meta = run(tmp_path / "in", tiny_tok, tmp_path / "out0", num_workers=1, val_fraction=0.0)  # by design: no warning
    assert meta["empty_files"] == ["val.bin"] and "WARNING" not in data_process.format_report(meta)


def test_data_process_missing_or_empty_input_leaves_existing_outputs_byte_identical(tmp_path, tiny_tok):
    out = tmp_path / "out"
    run(write_documents(tmp_path / "in"), tiny_tok, out, num_workers=1)
    before = snapshot(out)
    assert sorted(before) == ["meta.json", "train.bin", "val.bin"]
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "short.txt").write_text("ab\ncd\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    for inp, error in ((tmp_path / "missing.jsonl", FileNotFoundError), (tmp_path / "empty.jsonl", EmptyInputError),
                       (tmp_path / "short.txt", EmptyInputError), (tmp_path / "folder", EmptyInputError)):
        for target in (out, tmp_path / "fresh"):
            with pytest.raises(error, match=re.escape(inp.name)):
                run(inp, tiny_tok, target, num_workers=1)
        assert snapshot(out) == before and not (tmp_path / "fresh").exists()
