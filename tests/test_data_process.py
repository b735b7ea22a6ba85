"""data_process.py and babyllama/readers.py on a small mixed-format corpus written into tmp_path, with a
tiny tokenizer trained once per module."""
import collections
import json
import os
import random
import subprocess
import sys

from conftest import ENV, ROOT
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babyllama import records
from babyllama.poetry_corpus import poetry_document_files
from babyllama.readers import iter_documents, record_to_documents
from babyllama.records import ReadErrors, iter_records
import data_process
from tokenizer import Tokenizer
from tokenizer.train_tokenizer import train_tokenizer

MIN_CHARS = 5

JSONL_DOCS = ["床前明月光，疑是地上霜。", "  leading and trailing spaces kept  ", "two\nlines in one document"]
JSON_DOCS = ["白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "The quick brown fox jumps over the lazy dog."]
PARQUET_DOCS = ["春眠不觉晓，处处闻啼鸟。", "A parquet row with a completion column."]
TXT_DOCS = ["红豆生南国，春来发几枝。", "plain text line number two"]
POEMS = [
    {"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
    {"rhythmic": "如梦令", "author": "李清照", "paragraphs": ["常记溪亭日暮，", "", "沉醉不知归路。"]},
    {"chapter": "学而篇", "paragraphs": ["子曰：学而时习之，不亦说乎？"]},
    {"title": "空诗", "author": "无名", "paragraphs": []},  # no body: skipped and counted, not a document
]
POEM_TEXTS = ["静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
              "如梦令\n李清照\n常记溪亭日暮，\n沉醉不知归路。",
              "学而篇\n子曰：学而时习之，不亦说乎？"]
SHORT_DOCS = ["短", "abcd", "   ok   "]  # fewer than MIN_CHARS characters once stripped
EXPECTED = JSONL_DOCS + JSON_DOCS + PARQUET_DOCS + TXT_DOCS + POEM_TEXTS


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
        json.dump(POEMS, f, ensure_ascii=False, indent=2)
    return d


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    chars = "".join(sorted(set("".join(EXPECTED))))
    words = "the quick brown fox jumps over lazy dog model poem text line parquet row".split()
    filler = ["".join(rng.choice(chars) for _ in range(rng.randint(5, 30))) for _ in range(300)]
    filler += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    return train_tokenizer(iter(EXPECTED * 20 + filler), str(d / "tiny"), 400, verbose=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def run(corpus, tok_model, out, **kw):
    args = dict(text_field="", val_fraction=0.3, min_chars=MIN_CHARS, num_workers=2, chunk_docs=2, seed=1337,
                progress=False, verbose=False)
    args.update(kw)
    return data_process.process(str(corpus), tok_model, str(out), **args)


@pytest.fixture(scope="module")
def result(corpus, tok_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    meta = run(corpus, tok_model, out)
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


def test_bin_decodes_back_to_documents_separated_by_eos(result, tok_model):
    tok = Tokenizer(tok_model)
    out, meta = result
    toks = load_tokens(out)
    assert len(toks["train"]) > 0 and len(toks["val"]) > 0  # val_fraction=0.3 puts some on each side
    decoded = []
    for s in ("train", "val"):
        docs = split_docs(toks[s], tok.eos_id)
        assert len(docs) == meta[f"{s}_documents"]
        decoded += [tok.decode(d.tolist()) for d in docs]
    assert collections.Counter(decoded) == collections.Counter(EXPECTED)
    assert not set(SHORT_DOCS) & set(decoded)
    # each document's tokens are exactly its encoding followed by eos (no bos)
    train_docs = split_docs(toks["train"], tok.eos_id)
    first = tok.decode(train_docs[0].tolist())
    assert toks["train"][:len(train_docs[0]) + 1].tolist() == tok.encode(first, eos=True)


def test_malformed_json_line_skipped_counted_and_named(result, capsys):
    out, meta = result
    assert meta["malformed_by_reason"]["bad json"] == 1
    assert any(ex.startswith("a.jsonl:3: bad json") for ex in meta["malformed_examples"]), meta["malformed_examples"]
    # the poem without paragraphs is counted too, not silently lost
    assert meta["malformed_by_reason"]["empty paragraphs"] == 1
    assert meta["malformed_records"] == 2
    report = data_process.format_report(meta)
    assert "a.jsonl:3: bad json" in report
    # a malformed spot inside a .json array stops that file, keeps what came before, and is named by line
    bad = out.parent / "badjson"
    bad.mkdir()
    (bad / "x.json").write_text('[\n {"text": "first document ok"},\n {"text": oops},\n {"text": "never read"}\n]\n')
    errors = ReadErrors()
    docs = [d["text"] for d in iter_documents(str(bad), errors=errors)]
    assert docs == ["first document ok"]
    assert errors.count == 1 and errors.examples[0].startswith("x.json:3: bad json")
    assert "x.json:3" in errors.report()


def test_empty_input_is_clear_error(tmp_path, tok_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data_process.EmptyInputError, match="empty"):
        run(empty, tok_model, tmp_path / "out1")
    only_short = tmp_path / "short"
    only_short.mkdir()
    (only_short / "s.txt").write_text("ab\ncd\n", encoding="utf-8")
    with pytest.raises(data_process.EmptyInputError, match="2 shorter than min_chars"):
        run(only_short, tok_model, tmp_path / "out2")
    with pytest.raises(data_process.EmptyInputError, match="nomatch"):
        run(str(tmp_path / "nomatch*.jsonl"), tok_model, tmp_path / "out3")
    with pytest.raises(FileNotFoundError, match="missing"):
        run(tmp_path / "missing", tok_model, tmp_path / "out4")
    for name in ("out1", "out2", "out3", "out4"):  # no empty or half-written files left behind
        d = tmp_path / name
        assert not d.exists() or os.listdir(d) == []


def test_short_documents_dropped_and_counted(result):
    out, meta = result
    assert meta["dropped_short"] == len(SHORT_DOCS)
    assert meta["min_chars"] == MIN_CHARS
    assert meta["documents_read"] == len(EXPECTED) + len(SHORT_DOCS)
    assert meta["train_documents"] + meta["val_documents"] == len(EXPECTED)


def test_poetry_layout_reader(corpus, tmp_path):
    errors = ReadErrors()
    docs = list(iter_documents(str(corpus / "poems.json"), errors=errors))
    assert [d["text"] for d in docs] == POEM_TEXTS
    assert docs[0]["title"] == "静夜思" and docs[0]["author"] == "李白"
    assert errors.by_reason == {"empty paragraphs": 1}
    # variants found in the chinese-poetry package
    assert record_to_documents({"title": "长相思", "para": ["山一程，水一程"], "author": "纳兰性德"})[0][0]["text"] \
        == "长相思\n纳兰性德\n山一程，水一程"
    assert record_to_documents({"title": "关雎", "chapter": "国风", "content": ["关关雎鸠，在河之洲。"]})[0][0]["text"] \
        == "关雎\n关关雎鸠，在河之洲。"
    book = {"title": "千家詩", "author": "谢枋得", "content": [{"type": "五言絕句", "content": [
        {"chapter": "春眠", "author": "孟浩然", "paragraphs": ["春眠不覺曉，處處聞啼鳥。"]},
        {"chapter": "雪梅", "author": "盧梅坡", "paragraphs": [
            {"subchapter": "其一", "paragraphs": ["梅雪爭春未肯降，"]},
            {"subchapter": "其二", "paragraphs": ["有梅無雪不精神，"]}]}]}]}
    docs, problems = record_to_documents(book)
    assert problems == []
    assert [d["text"] for d in docs] == ["春眠\n孟浩然\n春眠不覺曉，處處聞啼鳥。",
                                         "雪梅\n盧梅坡\n其一\n梅雪爭春未肯降，\n其二\n有梅無雪不精神，"]
    assert docs[0]["collection"] == "千家詩"
    # a chinese-poetry package: non-document files are skipped by rule and counted, sources are relative
    pkg = tmp_path / "chinese-poetry"
    (pkg / "dist" / "quantangshi" / "error").mkdir(parents=True)
    (pkg / "dist" / "strains" / "json").mkdir(parents=True)
    (pkg / "package.json").write_text('{"name": "chinese-poetry", "version": "2.0.1"}')
    poem = [{"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。"], "id": "x"}]
    for rel in ("dist/quantangshi/poet.tang.0.json", "dist/quantangshi/error/poet.tang.0.json"):
        (pkg / rel).write_text(json.dumps(poem, ensure_ascii=False), encoding="utf-8")
    (pkg / "dist/quantangshi/authors.tang.json").write_text('[{"name": "李白", "desc": "..."}]', encoding="utf-8")
    (pkg / "dist/strains/json/poet.tang.0.json").write_text('[{"strains": ["平平"], "id": "x"}]')
    errors = ReadErrors()
    docs = list(iter_documents(str(pkg), errors=errors))
    assert [d["source"] for d in docs] == ["dist/quantangshi/poet.tang.0.json"]
    assert errors.count == 0 and errors.skipped_file_count == 3 and errors.files_read == 1
    docs = list(iter_documents(str(tmp_path), errors=ReadErrors()))  # a folder holding the package: same rules
    assert [d["source"] for d in docs] == ["chinese-poetry/dist/quantangshi/poet.tang.0.json"]
    files, skipped = poetry_document_files(str(pkg), include_error=True)
    assert len(files) == 2 and len(skipped) == 2


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
    assert p.returncode == 1 and "only 'poetry'" in p.stderr


def test_val_split_does_not_depend_on_worker_count(corpus, tok_model, tmp_path):
    run(corpus, tok_model, tmp_path / "w1", num_workers=1, chunk_docs=3)
    run(corpus, tok_model, tmp_path / "w2", num_workers=2, chunk_docs=2)
    for name in ("train.bin", "val.bin"):
        a = (tmp_path / "w1" / name).read_bytes()
        b = (tmp_path / "w2" / name).read_bytes()
        assert a == b and len(a) > 0
    # the split is a function of the text and the seed alone
    assert data_process.is_val("同一首诗", 0.5, 1) == data_process.is_val("同一首诗", 0.5, 1)
    assert not data_process.is_val("anything", 0.0, 1337)
    frac = np.mean([data_process.is_val(f"doc {i}", 0.1, 1337) for i in range(5000)])
    assert 0.08 < frac < 0.12


def test_meta_json_fields(result, tok_model, corpus):
    tok = Tokenizer(tok_model)
    out, meta = result
    with open(out / "meta.json", encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk == meta
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no *.tmp left
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer_model"] == tok_model
    assert meta["tokenizer_sha256"] == tok.sha256()
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id
    for s in ("train", "val"):
        assert os.path.getsize(out / f"{s}.bin") == 2 * meta[f"{s}_tokens"]
    assert meta["files_read"] == 5
    assert meta["malformed_records"] == 2
    folders = meta["sources"]["documents_per_folder"]
    assert folders == {".": len(JSONL_DOCS) + len(JSON_DOCS) + len(POEM_TEXTS), "sub": len(PARQUET_DOCS) + len(TXT_DOCS)}
    assert meta["sources"]["documents_per_source_top"]["poems.json"] == len(POEM_TEXTS)
    assert meta["input"] == [str(corpus)]
    assert meta["seconds"] >= 0 and meta["seed"] == 1337 and meta["val_fraction"] == 0.3


def test_refuses_vocab_over_uint16(corpus, tok_model, tmp_path, monkeypatch):
    class Big(data_process.Tokenizer):
        def __init__(self, path):
            super().__init__(path)
            self.vocab_size = 70000

    monkeypatch.setattr(data_process, "Tokenizer", Big)
    with pytest.raises(ValueError, match="uint16"):
        run(corpus, tok_model, tmp_path / "big")


def test_json_stream_and_txt_paragraphs(tmp_path, monkeypatch):
    # the incremental .json parser gives the same records whatever the read size
    recs = [{"text": "第%d篇" % i + "字" * (i * 7 % 50), "n": i} for i in range(40)]
    path = tmp_path / "recs.json"
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=1), encoding="utf-8")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text('{"a": 1}', encoding="utf-8")
    two.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    for chunk in (1, 3, 7, 64, 1 << 20):
        monkeypatch.setattr(records, "_JSON_CHUNK", chunk)
        assert [v for _, v in iter_records(path, ReadErrors())] == recs
        # one object, and concatenated objects
        assert [v for _, v in iter_records(one, ReadErrors())] == [{"a": 1}]
        assert [v for _, v in iter_records(two, ReadErrors())] == [{"a": 1}, {"a": 2}]
    p = tmp_path / "p.txt"
    p.write_text("para one\nstill one\n\n\npara two\n", encoding="utf-8")
    docs = list(iter_documents(str(p), txt_mode="paragraph"))
    assert [(d["text"], d["line"]) for d in docs] == [("para one\nstill one", 1), ("para two", 5)]
    # a line that is not UTF-8 is skipped and named, the rest is read
    q = tmp_path / "bad.jsonl"
    q.write_bytes(b'{"text": "good one"}\n{"text": "\xff\xfe"}\n{"text": "good two"}\n')
    errors = ReadErrors()
    assert [d["text"] for d in iter_documents(str(q), errors=errors)] == ["good one", "good two"]
    assert errors.examples[0].startswith(f"{q}:2: invalid utf-8")  # a file given by name: its path as given
