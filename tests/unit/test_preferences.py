"""babyllama/preferences.py: the preference loader gives the same pairs from every format people download (json,
jsonl, parquet; prompt/chosen/rejected, messages, ShareGPT conversations), counts and names every record it skips
by file and line (malformed, identical, not UTF-8), and refuses empty files, folders and files without a pair."""
import json
import re

from conftest import A, U, non_utf8_jsonl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babyllama.preferences import load_preferences, parse_pair
from babyllama.records import ReadErrors

GOOD_PAIR = {"prompt": "《静夜思》的作者是谁？", "chosen": "李白。", "rejected": "王之涣。"}


def _formats():
    q, c, r = "《静夜思》的作者是谁？", "李白。", "王之涣。"
    return [
        {"prompt": q, "chosen": c, "rejected": r},
        {"prompt": [U(q)], "chosen": [A(c)], "rejected": [A(r)]},
        {"chosen": [U(q), A(c)], "rejected": [U(q), A(r)]},  # implicit prompt
        {"conversations": [{"from": "human", "value": q}], "chosen": c, "rejected": r},  # dpo_zh_500.jsonl
        {"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": c},
         "rejected": {"from": "gpt", "value": r}},  # dpo_zh_demo.json
    ]


def test_loaders_same_pairs_from_every_format(tmp_path):
    want = {"system": None, "prompt": [U("《静夜思》的作者是谁？")], "chosen": "李白。", "rejected": "王之涣。"}
    recs = _formats()
    for rec in recs:
        assert parse_pair(rec) == want
    (tmp_path / "a.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in recs), encoding="utf-8")
    for i, rec in enumerate(recs):  # one parquet file per format (each has its own columns)
        pq.write_table(pa.Table.from_pylist([rec]), tmp_path / f"a{i}.parquet")
    for paths in ([str(tmp_path / "a.json")], [str(tmp_path / "a.jsonl")],
                  [str(tmp_path / f"a{i}.parquet") for i in range(len(recs))]):
        pairs, counts = load_preferences(paths)
        assert pairs == [want] * len(recs) and counts["kept"] == len(recs)
    sys_rec = {"conversations": [{"from": "system", "value": "你是诗人。"}, {"from": "human", "value": "问"},
                                 {"from": "gpt", "value": "答"}, {"from": "human", "value": "再问"}],
               "chosen": "好", "rejected": "坏"}
    assert parse_pair(sys_rec)["system"] == "你是诗人。" and len(parse_pair(sys_rec)["prompt"]) == 3


MIXED = [json.dumps({"prompt": "问", "chosen": "好", "rejected": "坏", "kind": "author"}, ensure_ascii=False),
         "{not json",
         json.dumps({"prompt": "问", "chosen": "好"}),  # no rejected
         json.dumps({"prompt": "问", "chosen": "同", "rejected": " 同 "}),  # identical
         json.dumps({"prompt": [A("我先说")], "chosen": "好", "rejected": "坏"}),  # prompt starts with the assistant
         json.dumps({"prompt": "问", "chosen": "", "rejected": "坏"}),  # empty reply
         json.dumps({"conversations": [{"from": "alien", "value": "x"}], "chosen": "a", "rejected": "b"}),
         json.dumps({"chosen": [U("问"), A("好")], "rejected": [U("别的"), A("坏")]}),  # prompts differ
         json.dumps([1, 2])]


def test_loaders_count_malformed_and_identical(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(MIXED), encoding="utf-8")
    pairs, counts = load_preferences(str(tmp_path / "m.jsonl"))
    assert len(pairs) == 1 and counts["kept"] == 1 and counts["records"] == 9
    assert counts["identical pair"] == 1 and counts["malformed: bad json"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("malformed")) == 7
    assert pairs[0]["kind"] == "author"  # the optional label is kept


def test_load_preferences_names_each_skipped_record_by_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(MIXED), encoding="utf-8")
    errors = ReadErrors()
    load_preferences(str(path), errors)
    assert errors.count == 8
    assert errors.examples[0].startswith(f"{path}:2: bad json")
    assert errors.examples[1:] == [f"{path}:3: no chosen/rejected", f"{path}:4: identical pair",
                                   f"{path}:5: prompt turns do not alternate user/assistant", f"{path}:6: empty reply",
                                   f"{path}:7: conversations: unknown or missing role",
                                   f"{path}:8: chosen and rejected have different prompts",
                                   f"{path}:9: record not an object"]


def test_load_preferences_refuses_empty_files_folders_and_files_without_a_pair(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no preference pair in it")):
        load_preferences(str(empty))
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path}: a folder")):
        load_preferences(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_preferences(str(tmp_path / "missing.json"))
    # malformed JSON in a .json array: the pairs before it are kept, the spot is counted and named
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "问", "chosen": "好", "rejected": "坏"},\n{"prompt": oops}\n]', encoding="utf-8")
    errors = ReadErrors()
    pairs, counts = load_preferences(str(broken), errors)
    assert len(pairs) == 1 and counts["malformed: bad json"] == 1 and counts["records"] == 2
    assert errors.examples[0].startswith(f"{broken}:3: bad json")
    broken.write_text('[\n{"prompt": oops}\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{broken}: no usable preference pair: 1 records skipped, "
                                                   f"e.g. {broken}:2: bad json")):
        load_preferences(str(broken))


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
