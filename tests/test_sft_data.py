"""babyllama/conversations.py and sft_data_process.py: every input format parses to the same conversation,
malformed records are counted and named, filters count what they drop, mixing is deterministic, the unified
file reads back, and the poetry demo set holds poems out."""
from collections import Counter
import json
import random
import re

from conftest import run_script
import pytest
from sft_fixtures import tiny_tokenizer

from babyllama import conversations as cv
from babyllama.conversations import load_conversations
from babyllama.records import ReadErrors
import sft_data_process as sdp

Q1, A1, Q2, A2 = "请写一首诗。", "床前明月光。", "作者是谁？", "李白。"
SYSTEM = "你是助手。"
EXPECTED = {"system": SYSTEM, "messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                                           {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]}
RECORDS = {
    "alpaca": {"instruction": Q2, "input": "", "output": A2, "history": [[Q1, A1]], "system": SYSTEM},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
                                   {"from": "gpt", "value": A1}, {"from": "human", "value": Q2},
                                   {"from": "gpt", "value": A2}]},
    "openai": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                            {"role": "assistant", "content": A2}]},
}


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_parses_to_the_same_conversation(fmt):
    got_fmt, conv = cv.parse_record(RECORDS[fmt])
    assert got_fmt == fmt and conv == EXPECTED


def test_alpaca_input_and_belle():
    fmt, conv = cv.parse_record({"instruction": "翻译：", "input": "hello", "output": "你好"})
    assert fmt == "alpaca" and conv["messages"][0]["content"] == "翻译：\nhello" and conv["system"] is None
    fmt, conv = cv.parse_record({"instruction": "翻译 hello", "output": "你好"})
    assert fmt == "belle" and conv["messages"] == [{"role": "user", "content": "翻译 hello"},
                                                   {"role": "assistant", "content": "你好"}]


def write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # every row gets every column (null where a record lacks it), as real mixed parquet files do
        schema = pa.unify_schemas([pa.Table.from_pylist([r]).schema for r in records])
        pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_files_of_each_kind_and_mixed_formats(tmp_path, kind):
    recs = [RECORDS["alpaca"], RECORDS["openai"]] if kind == "parquet" else list(RECORDS.values())
    path = tmp_path / f"mixed.{kind}"
    write(path, recs, kind)
    errors, formats = ReadErrors(), Counter()
    convs = list(cv.read_raw_conversations(path, errors, formats))
    assert errors.count == 0 and len(convs) == len(recs)
    for c in convs:
        assert {"system": c["system"], "messages": c["messages"]} == EXPECTED
        assert c["source"] == path.name


def test_malformed_records_counted_and_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(RECORDS["openai"]), "{not json", json.dumps({"foo": 1}), json.dumps([1, 2]),
             json.dumps({"conversations": [{"from": "alien", "value": "x"}]}),
             json.dumps({"instruction": 5, "output": "x"}), json.dumps(RECORDS["sharegpt"])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = ReadErrors()
    convs = list(cv.read_raw_conversations(path, errors, Counter()))
    assert len(convs) == 2
    assert errors.count == 5
    assert errors.by_reason == {"bad json": 1, "unknown format": 1, "not an object": 1, "unknown role": 1,
                                "field not a string": 1}
    assert errors.examples[0].startswith(f"{path}:2: bad json")
    assert any(e.startswith(f"{path}:5: unknown role") for e in errors.examples)
    # a broken .json array: records before the break are kept, the spot is named
    jpath = tmp_path / "broken.json"
    jpath.write_text('[\n' + json.dumps(RECORDS["openai"]) + ',\n{"instruction": \n', encoding="utf-8")
    errors = ReadErrors()
    assert len(list(cv.read_raw_conversations(jpath, errors, Counter()))) == 1
    assert errors.by_reason == {"bad json": 1} and str(jpath) in errors.examples[0]


def test_filters_count_each_reason(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    good = {"system": None, "messages": [u("你好"), a("你好，我是助手。")]}
    long_two = {"system": None, "messages": [u("你好"), a("好"), u("今天天气很好" * 20), a("好" * 50)]}
    convs = [good, dict(good), {"system": None, "messages": [u("你好"), a("  ")]},
             {"system": None, "messages": [u("a"), u("b"), a("c")]}, {"system": None, "messages": [u("a")]},
             {"system": None, "messages": [a("a"), u("b")]}, long_two]
    f = sdp.Filter(tok, 40, "drop", True)
    kept = [c for c in map(f, convs) if c is not None]
    assert kept == [good]
    assert f.counts == {"kept": 1, "exact duplicate": 1, "empty turn": 1,
                        "turns do not alternate user/assistant": 2, "does not end with an assistant turn": 1,
                        "longer than 40 tokens (dropped)": 1}
    f = sdp.Filter(tok, 40, "truncate", True)
    cut = f(long_two)
    assert cut["messages"] == long_two["messages"][:2] and f.counts["longer than 40 tokens (truncated, kept)"] == 1
    assert sdp.conversation_length(tok, cut) <= 40


def test_mix_ratios_are_deterministic():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    m1 = sdp.mix([a, b], [0.5, 1.5], random.Random(3))
    assert m1 == sdp.mix([a, b], [0.5, 1.5], random.Random(3))
    assert sum(x.startswith("a") for x in m1) == 5 and sum(x.startswith("b") for x in m1) == 15


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_load_conversations_reads_back_what_is_written(tmp_path, kind):
    convs = [dict(EXPECTED, source="a.json"),
             {"system": None, "messages": EXPECTED["messages"][:2], "source": "b.jsonl"}]
    path = tmp_path / f"train.{kind}"
    sdp.write_conversations(str(path), convs, kind)
    assert load_conversations(path) == [{"messages": c["messages"], "system": c["system"], "source": c["source"]}
                                        for c in convs]


def test_load_conversations_names_unusable_records_and_refuses_a_file_without_any(tmp_path):
    good = {"messages": EXPECTED["messages"], "system": None, "source": "x"}
    lines = [json.dumps(good, ensure_ascii=False), "{not json", json.dumps([1]),
             json.dumps({"messages": EXPECTED["messages"][:3], "system": None, "source": "x"})]  # ends with user
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = ReadErrors()
    assert load_conversations(path, errors) == [good]
    assert errors.examples == [f"{path}:2: bad json (Expecting property name enclosed in double quotes at column 2)",
                               f"{path}:3: not an object (list)", f"{path}:4: does not end with an assistant turn"]
    path.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    want = f"{path}: no usable conversation: 3 records skipped, e.g. {path}:1: bad json"
    with pytest.raises(ValueError, match=re.escape(want)):
        load_conversations(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no conversation in it")):
        load_conversations(path)


def test_script_with_poetry_demo(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    poetry = tmp_path / "poetry"
    poetry.mkdir()
    chars = "山水月花风云春秋江河天地日夜人归"
    rng = random.Random(0)
    poems = []
    for i in range(30):
        line = lambda: "".join(rng.choice(chars) for _ in range(5))
        poems.append({"title": f"题{i}", "author": f"诗人{i % 7}",
                      "paragraphs": [f"{line()}，{line()}。", f"{line()}，{line()}。"]})
    poems.append({"title": "不规则", "author": "某", "paragraphs": ["山水，月花风云春。"]})
    (poetry / "poet.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    inp = tmp_path / "in.jsonl"
    write(inp, [RECORDS["openai"], RECORDS["sharegpt"], {"bad": 1}], "jsonl")
    out = tmp_path / "out"
    p = run_script("sft_data_process.py", f"--inputs={inp}", f"--demo_poetry={poetry}",
                   f"--tokenizer_model={tok.model_path}", f"--out_dir={out}", "--demo_eval_poems=5",
                   "--val_fraction=0.0", "--max_seq_len=200", timeout=120)
    assert "exact duplicate 1" in p.stdout and "unknown format" in p.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["demo"]["regular poems found"] == 30 and stats["demo"]["demo poems held out"] == 5
    train, val = load_conversations(out / "train.jsonl"), load_conversations(out / "val.jsonl")
    questions = [json.loads(l) for l in open(out / "eval_questions.jsonl", encoding="utf-8")]
    assert len(questions) == 10 and {q["kind"] for q in questions} == {"author", "poem"}
    held_titles = {q["question"].split("《")[1].split("》")[0] for q in questions}
    train_text = json.dumps(train, ensure_ascii=False)
    assert all(f"《{t}》" not in train_text for t in held_titles)  # held-out poems never trained on
    assert any(f"《{t}》" in json.dumps(val, ensure_ascii=False) for t in held_titles)
    assert any(len(c["messages"]) == 4 for c in train)  # two-turn conversations
    kinds = {c["messages"][0]["content"][:2] for c in train}
    assert {"请写", "续写"} <= kinds
