"""babyllama.records.iter_records: the one record reader behind the document readers and the chat-data loaders,
and its one error convention (every skipped record named file:line in a ReadErrors)."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babyllama import records
from babyllama.records import ReadErrors, iter_records

RECS = [{"text": "床前明月光"}, {"text": "疑是地上霜", "n": 2}, [1, 2], "a bare string"]


def read(path, **kw):
    errors = ReadErrors()
    return list(iter_records(path, errors, **kw)), errors


def test_jsonl_skips_a_bad_json_line_and_an_invalid_utf8_line_naming_each(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{broken\n\n{"text": "\xff\xfe"}\n{"text": "four"}\n')  # BOM first
    records, errors = read(path)
    assert records == [(1, {"text": "one"}), (5, {"text": "four"})]  # blank line 3 is no record
    assert errors.count == 2 and errors.by_reason == {"bad json": 1, "invalid utf-8": 1}
    assert errors.examples[0].startswith(f"{path}:2: bad json")
    assert errors.examples[1].startswith(f"{path}:4: invalid utf-8")
    assert errors.files_read == 1


def test_source_names_the_file_in_errors_and_gz_is_read(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\nnot json\n')
    records, errors = read(path, source="shard/a.jsonl.gz")
    assert records == [(1, {"a": 1})] and errors.examples[0].startswith("shard/a.jsonl.gz:2: bad json")


def test_json_array_single_value_and_concatenated_values(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(RECS, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp_path / "one.json").write_text('\n{"text": "整本书"}', encoding="utf-8")
    (tmp_path / "cat.json").write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3}', encoding="utf-8")
    assert [r for _, r in read(tmp_path / "arr.json")[0]] == RECS
    assert read(tmp_path / "one.json")[0] == [(2, {"text": "整本书"})]
    assert read(tmp_path / "cat.json")[0] == [(1, {"a": 1}), (2, {"a": 2}), (4, {"a": 3})]


def test_json_parser_gives_the_same_records_whatever_the_read_size(tmp_path, monkeypatch):
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


def test_json_stops_at_a_malformed_spot_keeping_the_records_before(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n {"text": "kept"},\n {"text": oops},\n {"text": "never read"}\n]\n', encoding="utf-8")
    records, errors = read(path)
    assert records == [(2, {"text": "kept"})]
    assert errors.count == 1 and errors.examples[0].startswith(f"{path}:3: bad json")
    assert "rest of file not read" in errors.examples[0]


def test_json_with_invalid_utf8_stops_and_names_its_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'[\n {"text": "a"},\n {"text": "b"},\n {"text": "\xff"}\n]\n')
    records, errors = read(path)
    assert errors.by_reason == {"invalid utf-8": 1} and errors.examples[0].startswith(f"{path}:4: invalid utf-8")
    assert records == []  # the decoder refuses the whole read-ahead chunk: here, the whole small file


def test_parquet_gives_whole_rows_numbered_from_one(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "问", "n": 1}, {"q": None, "n": 2}]), path)
    records, errors = read(path)
    assert records == [(1, {"q": "问", "n": 1}), (2, {"q": None, "n": 2})]
    assert errors.count == 0 and errors.files_read == 1


def test_refuses_unsupported_types_missing_files_and_folders_when_called(tmp_path):
    (tmp_path / "notes.txt").write_text("text files hold documents, not records\n")
    errors = ReadErrors()
    with pytest.raises(ValueError, match="notes.txt: unsupported file type"):
        iter_records(tmp_path / "notes.txt", errors)  # raised by the call itself, before any iteration
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        iter_records(tmp_path / "nowhere.jsonl", errors)
    with pytest.raises(IsADirectoryError, match="a folder"):
        iter_records(tmp_path, errors)
    assert errors.files_read == 0


def test_csv_rows_are_records_by_header_with_quoted_newlines_and_bad_rows_named(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('department,title,ask,answer\n'
                    '心血管科,高血压能吃党参吗？,"我有高血压，\n可以吃党参吗？",可以少量吃。\n'
                    '消化科,胃痛,只有三列\n'
                    '\n'
                    '消化科,胃胀怎么办？,饭后胃胀,"少食多餐，""慢慢吃""。"\n', encoding="utf-8")
    records, errors = read(path)
    assert records == [(2, {"department": "心血管科", "title": "高血压能吃党参吗？", "ask": "我有高血压，\n可以吃党参吗？",
                            "answer": "可以少量吃。"}),
                       (6, {"department": "消化科", "title": "胃胀怎么办？", "ask": "饭后胃胀", "answer": '少食多餐，"慢慢吃"。'})]
    assert errors.count == 1 and errors.by_reason == {"bad csv row": 1}
    assert any(e.startswith(f"{path}:4") for e in errors.examples)  # the short row, named by its line


def test_csv_that_is_not_utf8_stops_and_keeps_the_rows_before(tmp_path):
    path = tmp_path / "gbk.csv"
    path.write_bytes("ask,answer\n头晕,多休息\n".encode("utf-8") + "胸闷,就医\n".encode("gbk"))
    records, errors = read(path)
    assert records == [(2, {"ask": "头晕", "answer": "多休息"})] and errors.by_reason == {"invalid utf-8": 1}


def test_csv_with_a_quote_left_open_or_a_field_named_twice_stops_naming_the_line(tmp_path):
    path = tmp_path / "open.csv"
    path.write_text('ask,answer\n头晕,多休息\n胸闷,"就医\n心慌,测心率\n', encoding="utf-8")
    records, errors = read(path)
    assert records == [(2, {"ask": "头晕", "answer": "多休息"})] and errors.by_reason == {"bad csv": 1}
    assert any(e.startswith(f"{path}:3") for e in errors.examples)  # where the open quote's row starts
    cut = tmp_path / "cut.csv"  # a bad line inside a quoted field: the row it breaks is not kept
    cut.write_bytes('ask,answer\n头晕,"多休息\n'.encode("utf-8") + "胸闷\n".encode("gbk") + '"\n'.encode("utf-8"))
    records, errors = read(cut)
    assert records == [] and errors.by_reason == {"invalid utf-8": 1, "bad csv": 1}
    twice = tmp_path / "twice.csv"
    twice.write_text("a,a\n1,2\n", encoding="utf-8")
    records, errors = read(twice)
    assert records == [] and errors.by_reason == {"bad csv header": 1}
