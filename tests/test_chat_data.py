"""babyllama/preferences.py, babyllama/poetry.py and dpo_data_process.py: the preference loader gives the same
pairs from every format and names every record it skips, the one well-formed-poem rule on hand-written poems,
and the demo preference set built from poetry documents."""
import json
import random
import re

from conftest import run_script
import pytest

from babyllama.poem_form import poem_clauses, well_formed_poem
from babyllama.poetry import build_poetry_pairs, corrupt
from babyllama.preferences import load_preferences, parse_pair
from babyllama.records import ReadErrors

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


# ---- the preference loader ----------------------------------------------------------------------------------

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
    import pyarrow as pa
    import pyarrow.parquet as pq
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


# ---- the one well-formed-poem rule ----------------------------------------------------------------------------

def test_one_rule_accepts_regular_poems_and_rejects_the_rest():
    quatrain = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    regulated = ("国破山河在，城春草木深。\n感时花溅泪，恨别鸟惊心。\n"
                 "烽火连三月，家书抵万金。\n白头搔更短，浑欲不胜簪。")
    for text in (quatrain, regulated, "朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山！",
                 "床前明月光，疑是地上霜？\n\n举头望明月；低头思故乡。",  # a blank line, ？ and ； are fine
                 quatrain + "\n。"):  # a stray mark on a line of its own: the clauses are still regular
        assert well_formed_poem(text), text
    for text in ("", "床前明月光，疑是地上霜，\n举头望明月，低头思故乡。",  # a line ends with ，
                 "床前明月光，疑是地上霜。",  # two clauses
                 "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n床前明月光，疑是地上霜。",  # six
                 "床前明月光，疑是地上霜。\n举头望明月，低头思故乡啊。",  # one clause of six characters
                 "床前明月，疑是地上。\n举头望月，低头思乡。",  # four characters
                 "静夜思\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",  # a title line is not a clause
                 "床前明月光，疑是地上霜。\n举头望明、月，低头思故乡。"):  # 、 ends a clause too
        assert not well_formed_poem(text), text
    assert poem_clauses(quatrain) == ["床前明月光，", "疑是地上霜。", "举头望明月，", "低头思故乡。"]
    assert poem_clauses(quatrain + "\n。") == poem_clauses(quatrain)  # the stray mark is no clause
    assert poem_clauses("床前明月光，疑是地上霜？。\n举头望明月，低头思故乡。") == \
        ["床前明月光，", "疑是地上霜？", "举头望明月，", "低头思故乡。"]  # a doubled mark: the first one ends it
    assert poem_clauses(regulated)[-1] == "浑欲不胜簪。" and len(poem_clauses(regulated)) == 8
    assert poem_clauses("床前明月光，疑是地上霜。") is None


# ---- the demo preference set ----------------------------------------------------------------------------------

POEMS = [("靜夜思", "李白", "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"),
         ("登鸛雀樓", "王之渙", "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"),
         ("春曉", "孟浩然", "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"),
         ("江雪", "柳宗元", "千山鳥飛絕，萬徑人蹤滅。\n孤舟蓑笠翁，獨釣寒江雪。"),
         ("壞詩", "某", "這不是一首，規整的詩")]


def write_poems(path):
    path.write_text(json.dumps([{"title": t, "author": a, "paragraphs": b.split("\n")} for t, a, b in POEMS],
                               ensure_ascii=False), encoding="utf-8")


def test_demo_pairs_from_poetry_docs(tmp_path):
    path = tmp_path / "poet.tang.0.json"
    write_poems(path)
    train, val, stats = build_poetry_pairs([str(path)], n_poems=10, n_val=1, seed=0)
    assert stats["poems used"] == 4 and len(val) == 3 and len(train) == 9
    val_titles = {p["prompt"][0]["content"] for p in val}
    assert not val_titles & {p["prompt"][0]["content"] for p in train}  # held-out poems are in no train pair
    for p in train + val:
        assert p["chosen"] != p["rejected"]
        if p["kind"] == "author":
            assert p["rejected"].startswith(p["chosen"].split("的作者是")[0])
    cl = poem_clauses(POEMS[0][2])
    assert len(cl) == 4 and corrupt(cl, "truncated", random.Random(0)) == "床前明月光，疑是地上霜。"
    assert corrupt(cl, "repeated", random.Random(0)) == "床前明月光，疑是地上霜。\n床前明月光，疑是地上霜。"
    shuffled = corrupt(cl, "shuffled", random.Random(0))
    assert sorted(shuffled.replace("\n", "").replace("，", "。").split("。")) == sorted(
        POEMS[0][2].replace("\n", "").replace("，", "。").split("。"))  # the same clauses ...
    assert shuffled != POEMS[0][2]  # ... in another order


def test_dpo_data_process_builds_and_counts(tmp_path):
    poetry = tmp_path / "poetry"
    poetry.mkdir()
    write_poems(poetry / "poet.tang.0.json")
    out = tmp_path / "out"
    run_script("dpo_data_process.py", f"--demo_poetry={poetry}", "--demo_glob=poet.tang.*.json",
               f"--out_dir={out}", "--demo_val_poems=1", timeout=60)
    pairs, counts = load_preferences(f"{out / 'train.jsonl'},{out / 'val.jsonl'}")
    assert counts["records"] == counts["kept"] == 12 and {p["kind"].split("/")[0] for p in pairs} == \
        {"poem", "author", "continue"}
    p = run_script("dpo_data_process.py", f"--count={out / 'val.jsonl'}", timeout=60)
    assert json.loads(p.stdout.splitlines()[-1])["kept"] == 3
    (tmp_path / "empty.jsonl").write_text("")
    p = run_script("dpo_data_process.py", f"--count={tmp_path / 'empty.jsonl'}", check=False, timeout=60)
    assert p.returncode == 1 and "empty.jsonl: no preference pair in it" in p.stderr
    assert "Traceback" not in p.stderr
