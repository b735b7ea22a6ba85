"""Fault injection on the data side: bad, missing or empty input to clean_data, data_process.py,
sft_data_process.py, dpo_data_process.py and the chat-data loaders. Each is a clear error naming the input (a
non-zero exit from the command line, no traceback), nothing is created or replaced (files already in out_dir stay
byte-identical, no temporary file is left), and bad records among good ones are skipped and named file:line."""
import json
import os
import re

from conftest import run_script
import pytest
from sft_fixtures import tiny_tokenizer

from babyllama.conversations import load_conversations
from babyllama.preferences import load_preferences
from babyllama.readers import EmptyInputError
from babyllama.records import ReadErrors, iter_records
from clean_data.clean import clean
import data_process

GOOD_SFT = {"instruction": "请写一首诗。", "output": "床前明月光。"}
GOOD_PAIR = {"prompt": "《静夜思》的作者是谁？", "chosen": "李白。", "rejected": "王之涣。"}


def snapshot(d):
    """{file name: bytes} of every file in folder d (empty when d does not exist)."""
    if not os.path.isdir(d):
        return {}
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def non_utf8_jsonl(path, first, last):
    """Two good records as lines 1 and 3, and a line that is not UTF-8 between them (line 2)."""
    line = lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n"
    path.write_bytes(line(first) + b'{"text": "\xff\xfe"}\n' + line(last))


def corpus(d, n=6):
    """A few distinct documents in d/in.jsonl, long enough for every clean_data filter."""
    d.mkdir(parents=True, exist_ok=True)
    texts = [f"第{i}篇：" + "".join(chr(0x4E00 + (i * 37 + k * 11) % 400) for k in range(60)) for i in range(n)]
    write_jsonl(d / "in.jsonl", [{"text": t} for t in texts])
    return d / "in.jsonl"


# ---- 1. an empty training set is an error, never an empty file -------------------------------------------------

def test_sft_data_process_refuses_an_empty_training_set_naming_input_and_counts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train.jsonl", "val.jsonl", "stats.json"):  # a previous good run
        (out / name).write_text(f"old {name}\n", encoding="utf-8")
    before = snapshot(out)
    bad = tmp_path / "all_dropped.jsonl"  # every record filtered out or malformed
    bad.write_text(json.dumps({"instruction": "问", "output": "  "}, ensure_ascii=False) + "\n{not json\n",
                   encoding="utf-8")
    p = run_script("sft_data_process.py", f"--inputs={bad}", f"--out_dir={out}", check=False, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{bad}: no usable conversation: 2 records skipped" in p.stderr
    assert "empty turn 1" in p.stderr and "bad json 1" in p.stderr and f"{bad}:2: bad json" in p.stderr
    assert snapshot(out) == before  # nothing written, replaced or left behind


def test_dpo_demo_refuses_a_set_without_training_pairs_and_writes_nothing(tmp_path):
    poetry = tmp_path / "poet.tang.0.json"
    poems = [("静夜思", "李白", ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]),
             ("登鹳雀楼", "王之涣", ["白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。"])]
    poetry.write_text(json.dumps([{"title": t, "author": a, "paragraphs": b} for t, a, b in poems],
                                 ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    p = run_script("dpo_data_process.py", f"--demo_poetry={poetry}", "--demo_glob=", f"--out_dir={out}",
                   "--demo_val_poems=5", check=False, timeout=60)  # both poems held out: no training pair
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"no training pair from {poetry}: all 2 poems used are held out" in p.stderr
    assert not out.exists()


# ---- 2. clean_data: a missing input or one without documents exits non-zero -----------------------------------

@pytest.mark.parametrize("kind", ["missing path", "empty file", "empty folder"])
def test_clean_data_missing_or_documentless_input_exits_nonzero_writing_nothing(tmp_path, kind):
    inp = {"missing path": tmp_path / "nope.jsonl", "empty file": tmp_path / "empty.jsonl",
           "empty folder": tmp_path / "folder"}[kind]
    if kind == "empty file":
        inp.write_text("\n", encoding="utf-8")
    if kind == "empty folder":
        inp.mkdir()
    out = tmp_path / "out"
    p = run_script("-m", "clean_data", f"--input={inp}", f"--out_dir={out}", "--num_workers=1", check=False,
                   timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and str(inp) in p.stderr
    assert not out.exists()


# ---- 3. clean_data checks its input before opening its outputs, and writes them atomically ---------------------

def test_clean_data_typo_input_leaves_existing_outputs_byte_identical(tmp_path):
    good = corpus(tmp_path / "in")
    out = tmp_path / "out"
    report = clean(str(good), str(out), num_workers=1, progress=False)
    assert report["documents_out"] == 6
    before = snapshot(out)
    assert sorted(before) == ["clean.parquet", "removed.jsonl", "report.json"]
    p = run_script("-m", "clean_data", f"--input={tmp_path / 'in' / 'in.jsnol'}", f"--out_dir={out}",
                   "--num_workers=1", check=False, timeout=60)
    assert p.returncode == 1 and "in.jsnol" in p.stderr
    assert snapshot(out) == before  # byte-identical, and no *.tmp file
    # an error in the middle of the run (a corrupt file after a good one): the temporary files go, nothing else
    (tmp_path / "in" / "z.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="z.parquet: not a readable parquet file"):
        clean(str(tmp_path / "in"), str(out), num_workers=1, progress=False)
    assert snapshot(out) == before


# ---- 4. every loader: bad records skipped and named, an empty result a clear error ----------------------------

def test_sft_loader_skips_non_utf8_and_malformed_records_and_refuses_empty_or_folder(tmp_path):
    good = {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
            "system": None, "source": "x"}
    path = tmp_path / "train.jsonl"
    non_utf8_jsonl(path, good, good)
    errors = ReadErrors()
    assert load_conversations(path, errors) == [good, good]
    assert errors.by_reason == {"invalid utf-8": 1} and errors.examples[0].startswith(f"{path}:2: invalid utf-8")
    broken = tmp_path / "broken.json"  # malformed .json: the records before the break are kept and it is named
    broken.write_text("[" + json.dumps(good) + ",\n{oops}]", encoding="utf-8")
    errors = ReadErrors()
    assert load_conversations(broken, errors) == [good] and errors.examples[0].startswith(f"{broken}:2: bad json")
    broken.write_text("[{oops}]", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{broken}: no usable conversation: 1 records skipped, e.g. "
                                                   f"{broken}:1: bad json") + ".*skipped by reason: bad json 1"):
        load_conversations(broken)
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl: no conversation in it"):
        load_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path}: a folder")):
        load_conversations(tmp_path)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # refused when called: opening it would block
        iter_records(fifo, ReadErrors())


def test_sft_data_process_script_skips_non_utf8_lines_and_refuses_empty_or_folder_input(tmp_path):
    path = tmp_path / "a.jsonl"
    non_utf8_jsonl(path, GOOD_SFT, dict(GOOD_SFT, output="疑是地上霜。"))
    out = tmp_path / "out"
    p = run_script("sft_data_process.py", f"--inputs={path}", f"--out_dir={out}", "--val_fraction=0.0", timeout=60)
    assert f"{path}:2: invalid utf-8" in p.stdout
    assert len(load_conversations(out / "train.jsonl")) == 2  # both good lines kept
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["malformed"]["malformed_by_reason"] == {"invalid utf-8": 1}
    before = snapshot(out)
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "folder.jsonl").mkdir()
    for bad, says in ((tmp_path / "empty.jsonl", "no conversation in it"), (tmp_path / "folder.jsonl", "a folder")):
        p = run_script("sft_data_process.py", f"--inputs={path},{bad}", f"--out_dir={out}", check=False, timeout=60)
        assert p.returncode == 1 and "Traceback" not in p.stderr and f"error: {bad}: {says}" in p.stderr
        assert snapshot(out) == before


def test_preference_loader_skips_non_utf8_and_malformed_records_and_refuses_empty_or_folder(tmp_path):
    path = tmp_path / "pairs.jsonl"
    non_utf8_jsonl(path, GOOD_PAIR, dict(GOOD_PAIR, chosen="李白作。"))
    errors = ReadErrors()
    pairs, counts = load_preferences(str(path), errors)
    assert len(pairs) == 2 and counts["records"] == 3 and counts["malformed: invalid utf-8"] == 1
    assert errors.examples[0].startswith(f"{path}:2: invalid utf-8")
    broken = tmp_path / "broken.json"
    broken.write_text("[" + json.dumps(GOOD_PAIR, ensure_ascii=False) + ",\n{oops}]", encoding="utf-8")
    pairs, counts = load_preferences(str(broken))
    assert len(pairs) == 1 and counts["malformed: bad json"] == 1
    path.write_bytes(b'{"prompt": "\xff"}\n{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: no usable preference pair: 2 records skipped") +
                       ".*skipped by reason: invalid utf-8 1, no chosen/rejected 1"):
        load_preferences(str(path))
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.json: no preference pair in it"):
        load_preferences(str(tmp_path / "empty.json"))
    with pytest.raises(IsADirectoryError, match="a folder"):
        load_preferences(str(tmp_path))


# ---- 5. data_process.py: empty val.bin named in meta.json; nothing touched on an empty input -------------------

@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok")).model_path


def tokenize(inp, tok_path, out, **kw):
    args = dict(min_chars=5, num_workers=1, progress=False, verbose=False, val_fraction=1e-9)
    return data_process.process(str(inp), tok_path, str(out), **dict(args, **kw))


def test_data_process_meta_names_an_empty_val_file_and_the_warning_names_it(tmp_path, tok_path):
    out = tmp_path / "out"
    meta = tokenize(corpus(tmp_path / "in", 3), tok_path, out)  # 3 documents: none falls under val_fraction
    assert os.path.getsize(out / "val.bin") == 0  # still written: the format does not change
    on_disk = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert on_disk["empty_files"] == ["val.bin"]
    assert on_disk["tokens_per_file"] == {"train.bin": os.path.getsize(out / "train.bin") // 2, "val.bin": 0}
    report = data_process.format_report(meta, str(out))
    assert f"WARNING: {out / 'val.bin'} is empty (0 tokens)" in report
    meta = tokenize(tmp_path / "in", tok_path, tmp_path / "out0", val_fraction=0.0)  # empty by design: no warning
    assert meta["empty_files"] == ["val.bin"] and "WARNING" not in data_process.format_report(meta)


def test_data_process_missing_or_empty_input_leaves_existing_outputs_byte_identical(tmp_path, tok_path):
    out = tmp_path / "out"
    tokenize(corpus(tmp_path / "in"), tok_path, out, val_fraction=0.3)
    before = snapshot(out)
    assert sorted(before) == ["meta.json", "train.bin", "val.bin"]
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "short.txt").write_text("ab\ncd\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    for inp, error in ((tmp_path / "missing.jsonl", FileNotFoundError), (tmp_path / "empty.jsonl", EmptyInputError),
                       (tmp_path / "short.txt", EmptyInputError), (tmp_path / "folder", EmptyInputError)):
        for target in (out, tmp_path / "fresh"):
            with pytest.raises(error, match=re.escape(inp.name)):
                tokenize(inp, tok_path, target)
        assert snapshot(out) == before and not (tmp_path / "fresh").exists()
