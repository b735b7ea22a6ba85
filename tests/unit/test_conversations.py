"""babyllama/conversations.py: every input format (alpaca, belle, sharegpt, openai messages) parses to the same
conversation in json, jsonl and parquet files; malformed records are counted and named file:line (not UTF-8 too);
the unified file reads back; an empty file, a folder or a file without a usable conversation is refused."""
from collections import Counter
import json
import os
import re

from conftest import non_utf8_jsonl, write_jsonl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babyllama import conversations as cv
from babyllama.conversations import load_conversations
from babyllama.records import ReadErrors, iter_records

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
        write_jsonl(path, records)
    elif kind == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
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


def test_doctor_qa_rows_become_one_exchange_and_an_empty_ask_falls_back_to_the_title():
    fmt, conv = cv.parse_record({"department": "心血管科", "title": "高血压能吃党参吗？", "ask": "我有高血压，能吃党参吗？",
                                 "answer": "可以少量吃。"})
    assert fmt == "qa" and conv == {"system": None, "messages": [{"role": "user", "content": "我有高血压，能吃党参吗？"},
                                                                 {"role": "assistant", "content": "可以少量吃。"}]}
    assert cv.parse_record({"title": "胃胀怎么办？", "ask": "无", "answer": "少食多餐。"})[1]["messages"][0]["content"] \
        == "胃胀怎么办？"
    assert cv.parse_record({"question": "头晕？", "answer": "多休息。"})[0] == "qa"


def test_translation_pairs_become_instructions_with_the_classical_text_inside():
    fmt, conv = cv.parse_record({"classical": "学而时习之", "modern": "学习并且时常温习它", "source": "论语/学而"})
    assert fmt == "pairs" and conv["messages"][1] == {"role": "assistant", "content": "学习并且时常温习它"}
    prompt = conv["messages"][0]["content"]
    assert prompt in [p.format("学而时习之") for p in cv.TRANSLATION_PROMPTS]
    assert cv.parse_record({"classical": "学而时习之", "modern": "x"})[1]["messages"][0]["content"] == prompt  # stable
    # the phrasings vary over texts; evaluation always asks with the first
    assert len({cv.translation_prompt(c) for c in "甲乙丙丁戊己庚辛壬癸子丑寅卯"}) > 1
    assert cv.translation_prompt("学而时习之", 0) == "把下面的文言文翻译成现代文：\n学而时习之"


def test_doctor_qa_csv_reads_as_conversations_with_its_format_counted(tmp_path):
    path = tmp_path / "doctor.csv"
    path.write_text('department,title,ask,answer\n消化科,胃胀怎么办？,饭后胃胀,少食多餐。\n内科,头晕,"坐久了头晕，\n为什么？",起身活动。\n',
                    encoding="utf-8")
    formats = Counter()
    convs = list(cv.read_raw_conversations(path, ReadErrors(), formats))
    assert formats == {"qa": 2} and [c["line"] for c in convs] == [2, 3]
    assert convs[1]["messages"][0]["content"] == "坐久了头晕，\n为什么？" and convs[1]["source"] == "doctor.csv"
