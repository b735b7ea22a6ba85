"""sft_data_process.py: its filters count what they drop, mixing is deterministic, the unified file it writes reads
back, and as users run it: the poetry demo set holds poems out; lines that are not UTF-8 are skipped and named; an
empty training set, an empty input or a folder is a clear error that writes nothing."""
import json
import random

from conftest import A, CONVERSATIONS, U, non_utf8_jsonl, run_script, snapshot, write_jsonl, write_poems
import pytest

from babyllama.conversations import load_conversations
import sft_data_process as sdp

GOOD_SFT = {"instruction": "请写一首诗。", "output": "床前明月光。"}


def test_filters_count_each_reason(tiny_tok):
    tok, u, a = tiny_tok, U, A
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
    convs = [dict(CONVERSATIONS[2], source="a.json"), dict(CONVERSATIONS[3], source="b.jsonl")]
    path = tmp_path / f"train.{kind}"
    sdp.write_conversations(str(path), convs, kind)
    assert load_conversations(path) == [{"messages": c["messages"], "system": c["system"], "source": c["source"]}
                                        for c in convs]


def test_script_with_poetry_demo(tmp_path, tiny_tok):
    poetry = tmp_path / "poetry"
    poetry.mkdir()
    chars = "山水月花风云春秋江河天地日夜人归"
    rng = random.Random(0)
    line = lambda: "".join(rng.choice(chars) for _ in range(5))
    poems = [(f"题{i}", f"诗人{i % 7}", f"{line()}，{line()}。\n{line()}，{line()}。") for i in range(30)]
    write_poems(poetry / "poet.json", poems + [("不规则", "某", "山水，月花风云春。")])
    two_turns = CONVERSATIONS[3]["messages"]  # as openai messages, and again as ShareGPT: an exact duplicate
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in two_turns]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": two_turns}, {"conversations": sharegpt}, {"bad": 1}])
    out = tmp_path / "out"
    p = run_script("sft_data_process.py", f"--inputs={inp}", f"--demo_poetry={poetry}",
                   f"--tokenizer_model={tiny_tok.model_path}", f"--out_dir={out}", "--demo_eval_poems=5",
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
