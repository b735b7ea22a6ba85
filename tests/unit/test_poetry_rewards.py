"""babyllama/poetry_rewards.py, verifiable poem rewards on hand-written poems (malformed ones too): the request
read back, the form, repetition and title scores, the tone rules on a hand-made table, and the tone table built
from the corpus (characters read one way only; built once when missing)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import JING_YE_SI
import pytest

from babyllama.poetry_rewards import (build_tone_table, clauses_of, exact_form, form_score, load_tone_table,
                                      make_request, parse_request, poetry_reward, repeat_score, requests_from,
                                      title_score, tone_score)


def test_poetry_rewards_on_hand_written_poems():
    ask = make_request("静夜思", 5, 4)
    assert ask == "写一首五言绝句，题为《静夜思》" and parse_request(ask) == {"chars": 5, "clauses": 4, "title": "静夜思"}
    spec = parse_request(ask)
    assert form_score(JING_YE_SI, spec) == 1.0 and exact_form(ask, JING_YE_SI)
    assert form_score("静夜思\n" + JING_YE_SI, spec) == 1.0 and title_score("静夜思\n" + JING_YE_SI, spec) == 1.0
    assert title_score(JING_YE_SI, spec) == 0.0
    # a 七言 request for a 五言 poem: count right, lengths wrong, marks right -> (1 + 0 + 1) / 3
    assert form_score(JING_YE_SI, parse_request(make_request("静夜思", 7, 4))) == pytest.approx(2 / 3)
    # a 律诗 request: 4 of 8 clauses, all of the right length among them, marks right -> (0 + 4/8 + 4/8) / 3
    assert form_score(JING_YE_SI, parse_request(make_request("静夜思", 5, 8))) == pytest.approx(1 / 3)
    # malformed: no punctuation at all, one clause of 10 characters -> lengths 0, marks 0, count 0
    assert form_score("床前明月光疑是地上霜", spec) == 0.0 and form_score("", spec) == 0.0
    # wrong marks: every clause ends with "，" -> the 2nd and 4th marks are wrong: (1 + 1 + 2/4) / 3
    assert form_score("床前明月光，疑是地上霜，举头望明月，低头思故乡，", spec) == pytest.approx(2.5 / 3)
    repeated = "床前明月光，疑是地上霜。\n床前明月光，疑是地上霜。"
    assert repeat_score(repeated) == 0.5 and repeat_score(JING_YE_SI) == 1.0
    assert poetry_reward(ask, repeated) == pytest.approx(1.0 + 0.5 * 0.5)
    assert poetry_reward("写一首诗", JING_YE_SI) == 0.0  # no form asked for: nothing to verify
    assert clauses_of("a，b。c") == [("a", "，"), ("b", "。"), ("c", "")]


def test_tone_rules_on_a_hand_made_table():
    ask = parse_request(make_request("题", 5, 4))
    table = {"一": "平", "二": "仄", "三": "平", "四": "仄"}
    # clause 1 "甲一乙二丙": 2nd 一 平, 4th 二 仄: differ (pass); clause 2 "丁二戊二己": 二, 二 same (fail);
    # couplet: 一 vs 二 differ (pass). Clauses 3-4 hold no known character: no check. 2 of 3 pass
    reply = "甲一乙二丙，丁二戊二己。\n庚辛壬癸子，丑寅卯辰巳。"
    assert tone_score(reply, ask, table) == pytest.approx(2 / 3)
    assert tone_score("庚辛壬癸子，丑寅卯辰巳。", ask, table) == 0.0  # nothing checkable
    assert tone_score("甲一乙二丙丁戊，己。", ask, table) == 0.0  # a clause of the wrong length is not checked
    seven = parse_request(make_request("题", 7, 4))
    # 七言: 2nd/4th and 4th/6th: "甲一乙二丙三丁": 一 平 / 二 仄 pass, 二 仄 / 三 平 pass -> 2 of 2
    assert tone_score("甲一乙二丙三丁，", seven, table) == 1.0


def test_tone_table_keeps_characters_read_one_way(tmp_path):
    (tmp_path / "dist" / "strains" / "json").mkdir(parents=True)
    (tmp_path / "dist" / "quantangshi").mkdir(parents=True)
    poems, strains = [], []
    for i in range(10):  # 甲 is 平 9 times of 10, 乙 平 5 of 10, 丙 always 仄; 丁's line has a pattern of another length
        poems.append({"id": str(i), "paragraphs": ["甲乙丙", "丁"]})
        strains.append({"id": str(i), "strains": ["平" + ("平" if i % 2 else "仄") + "仄" if i else "仄平仄",
                                                  "平平"]})
    (tmp_path / "dist" / "strains" / "json" / "a.json").write_text(json.dumps(strains, ensure_ascii=False))
    (tmp_path / "dist" / "quantangshi" / "poet.tang.0.json").write_text(json.dumps(poems, ensure_ascii=False))
    assert build_tone_table(str(tmp_path)) == {"甲": "平", "丙": "仄"}


def test_a_missing_tone_table_is_built_from_the_corpus_once(tmp_path):
    (tmp_path / "dist" / "strains" / "json").mkdir(parents=True)
    (tmp_path / "dist" / "quantangshi").mkdir(parents=True)
    (tmp_path / "dist" / "strains" / "json" / "a.json").write_text(json.dumps([{"id": "0", "strains": ["平仄"]}],
                                                                               ensure_ascii=False))
    (tmp_path / "dist" / "quantangshi" / "poet.tang.0.json").write_text(
        json.dumps([{"id": "0", "paragraphs": ["甲乙"]}], ensure_ascii=False))
    table = tmp_path / "out" / "tones.json"
    assert load_tone_table(str(table), str(tmp_path)) == {"甲": "平", "乙": "仄"} == json.loads(table.read_text())
    assert load_tone_table(str(table), str(tmp_path / "gone")) == {"甲": "平", "乙": "仄"}  # read, not rebuilt
    with pytest.raises(ValueError, match="no tone patterns"):
        load_tone_table(str(tmp_path / "other.json"), str(tmp_path / "gone"))


def test_requests_from_reads_conversations_and_questions_and_counts_the_lines_it_skips(tmp_path):
    # JING_YE_SI: four clauses of five characters and a mark, so the request asks for a 五言绝句
    conv = {"messages": [{"role": "user", "content": "请写一首题为《静夜思》的诗。"},
                         {"role": "assistant", "content": JING_YE_SI}]}
    question = {"kind": "poem", "question": "请写一首题为《夜思》的诗。", "reference": JING_YE_SI}
    lines = [json.dumps(conv, ensure_ascii=False), "{not json", "", "[1, 2]", json.dumps(conv, ensure_ascii=False),
             json.dumps(question, ensure_ascii=False)]
    path = tmp_path / "train.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8") + b"\n\xff\xfe\n")  # and a line that is not UTF-8
    requests, skipped = requests_from(str(path))
    # one request per title (the repeated conversation gives none), in file order; the blank line is no record
    assert requests == [make_request("静夜思", 5, 4), make_request("夜思", 5, 4)]
    assert skipped == 3
    assert requests_from(str(path), limit=1) == ([make_request("静夜思", 5, 4)], 0)
    # a parquet SFT file (sft_data_process.py --out_format=parquet) gives the same requests
    other = {"messages": [dict(conv["messages"][0], content="请写一首题为《夜思》的诗。"), conv["messages"][1]]}
    pq.write_table(pa.Table.from_pylist([conv, other]), tmp_path / "train.parquet")
    assert requests_from(str(tmp_path / "train.parquet")) == (requests, 0)
