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


# ---- make demo-zh's inputs: doctor Q&A, translation pairs, identity templates, held-out evaluation questions ------

def qa(question, answer, source="doctor.csv"):
    return {"system": None, "messages": [U(question), A(answer)], "source": source, "format": "qa"}


def test_nearest_answer_is_the_answer_of_the_question_sharing_most_character_bigrams():
    pool = [(sdp.char_ngrams(q), a) for q, a in [("胃痛怎么办", "胃药"), ("头痛怎么办", "休息"), ("发烧吃什么药", "退烧药")]]
    # 头痛怎么治 vs 头痛怎么办: bigrams {头痛, 痛怎, 怎么} shared of 5 in the union (0.6); vs 胃痛怎么办 2 of 6
    assert sdp.nearest_answer("头痛怎么治", pool) == "休息"
    assert sdp.nearest_answer("胃 痛怎么 办？", pool) == "胃药"  # whitespace ignored
    assert sdp.nearest_answer("无关", pool) == "胃药"  # no overlap anywhere: the first (ties go to the first)
    assert sdp.char_ngrams("头痛") == {"头痛"} and sdp.char_ngrams("头") == {"头"}


def test_qa_hold_out_takes_n_questions_by_hash_never_trained_on_with_the_nearest_training_answer():
    import hashlib
    convs = [qa("头痛怎么办", "休息"), qa("头痛怎么治", "吃药"), qa("胃痛怎么办", "胃药"), qa("发烧吃什么药", "退烧药"),
             qa("咳嗽怎么办", "喝水")]
    train, questions = sdp.hold_out(convs, 2, None)
    digest = lambda q: hashlib.blake2b(q.encode(), digest_size=8).hexdigest()  # noqa: E731
    expected = sorted(convs, key=lambda c: digest(c["messages"][0]["content"]))[:2]
    assert [q["question"] for q in questions] == [c["messages"][0]["content"] for c in expected]
    assert len(train) == 3 and not {q["question"] for q in questions} & {c["messages"][0]["content"] for c in train}
    pool = [(sdp.char_ngrams(c["messages"][0]["content"]), c["messages"][1]["content"]) for c in train]
    for q, c in zip(questions, expected):
        assert q["reference"] == c["messages"][1]["content"] and q["kind"] == "qa" and q["source"] == "doctor.csv"
        assert q["baselines"] == {"nearest": sdp.nearest_answer(q["question"], pool)}
    # a question asked twice (two answers) is never on both sides
    twice = convs + [qa(c["messages"][0]["content"], "另一个回答") for c in expected]
    train, questions = sdp.hold_out(twice, 2, None)
    assert len(train) == 3 and not {q["question"] for q in questions} & {c["messages"][0]["content"] for c in train}
    # other formats are never held out
    alpaca = [dict(c, format="alpaca") for c in convs]
    assert sdp.hold_out(alpaca, 2, None) == (alpaca, [])


def test_pairs_from_validation_documents_leave_training_and_are_asked_with_the_copy_baseline():
    from babyllama.conversations import translation_prompt
    pairs = [{"system": None, "messages": [U(translation_prompt(c)), A(m)], "source": "pairs.jsonl",
              "format": "pairs", "classical": c}
             for c, m in [("学而时习之", "学习并且时常温习它"), ("温故而知新", "温习旧的知道新的"),
                          ("三人行", "几个人一起走"), ("知之为知之", "知道就是知道")]]
    val_lines = {"学习并且时常温习它", "几个人一起走", "不在数据里的一行"}
    train, questions = sdp.hold_out(pairs, 1, val_lines)
    assert [c["classical"] for c in train] == ["温故而知新", "知之为知之"]  # both validation pairs left training
    (q,) = questions
    assert q["reference"] in val_lines and q["kind"] == "pairs"
    classical = {"学习并且时常温习它": "学而时习之", "几个人一起走": "三人行"}[q["reference"]]
    assert q["question"] == "把下面的文言文翻译成现代文：\n" + classical and q["baselines"] == {"copy": classical}


def test_held_out_lines_are_the_lines_of_data_process_validation_documents_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from babyllama.split import is_val
    docs = [f"第{i}行甲。\n第{i}行乙。\n人人都有的一行。" for i in range(60)]  # the last line in every document
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in docs]), tmp_path / "clean.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"val_fraction": 0.3, "seed": 5}))
    lines = sdp.held_out_lines(str(tmp_path / "clean.parquet"), str(tmp_path / "meta.json"))
    expected = {line for d in docs if is_val(d, 0.3, 5) for line in d.split("\n")[:2]}
    assert lines == expected and 10 < len(expected) < 60  # a line a training document has too is not held out


def test_fill_replaces_the_given_placeholders_and_the_filter_drops_what_is_left_unfilled():
    f = sdp.Filter(values={"name": "BabyLlama"})
    named = f({"system": "我是{{name}}。", "messages": [U("你是谁？"), A("我是{{name}}。")]})
    assert named["messages"][1]["content"] == "我是BabyLlama。" and named["system"] == "我是BabyLlama。"
    assert f({"system": None, "messages": [U("谁开发了你？"), A("{{author}}。")]}) is None
    assert f.counts == {"kept": 1, "unfilled placeholder": 1}


def test_script_holds_out_doctor_questions_and_pairs_and_reports_each_input_share(tmp_path):
    doctor = tmp_path / "doctor.csv"
    doctor.write_text("department,title,ask,answer\n" + "".join(f"内科,问{i},第{i}个病人头晕怎么办,第{i}个回答多休息\n"
                                                               for i in range(30)), encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"classical": f"古文{i}曰", "modern": f"今文{i}说", "source": "书"} for i in range(40)])
    identity = tmp_path / "identity.json"
    identity.write_text(json.dumps([{"instruction": "你是谁？", "input": "", "output": "我是{{name}}。"}], ensure_ascii=False),
                        encoding="utf-8")
    out = tmp_path / "out"
    run_script("sft_data_process.py", f"--inputs={doctor},{pairs},{identity}", "--ratios=1,0.5,2", "--fill=name=BabyLlama",
               "--eval_holdout=5", "--val_fraction=0", f"--out_dir={out}")
    train = load_conversations(out / "train.jsonl")
    questions = [json.loads(line) for line in (out / "eval_questions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(q["kind"] for q in questions) == ["pairs"] * 5 + ["qa"] * 5
    trained = {c["messages"][1]["content"] for c in train}
    assert not trained & {q["reference"] for q in questions}
    assert {"我是BabyLlama。"} == {c["messages"][1]["content"] for c in train if c["source"] == "identity.json"}
    stats = json.loads((out / "stats.json").read_text())
    # 25 doctor rows, half of the 35 pairs left (18), the identity record twice: shares of the 45 conversations
    assert stats["train"] == 25 + 18 + 2
    assert stats["train_share"] == {"doctor.csv": round(25 / 45, 4), "pairs.jsonl": round(18 / 45, 4),
                                    "identity.json": round(2 / 45, 4)}


def test_script_holds_out_only_pairs_of_validation_documents_and_refuses_a_corpus_without_any(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from babyllama.split import is_val
    moderns = [f"今文第{i}句说的话" for i in range(60)]
    docs = ["\n".join(moderns[i:i + 3]) for i in range(0, 60, 3)]  # 20 documents of 3 sentences
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in docs]), tmp_path / "clean.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"val_fraction": 0.3, "seed": 3}))
    val = {m for d in docs if is_val(d, 0.3, 3) for m in d.split("\n")}
    assert 0 < len(val) < 60
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"classical": f"古文{i}曰", "modern": m} for i, m in enumerate(moderns)])
    out = tmp_path / "out"
    run_script("sft_data_process.py", f"--inputs={pairs}", "--eval_holdout=2", "--val_fraction=0",
               f"--heldout_corpus={tmp_path / 'clean.parquet'}", f"--token_meta={tmp_path / 'meta.json'}",
               f"--out_dir={out}")
    trained = {c["messages"][1]["content"] for c in load_conversations(out / "train.jsonl")}
    questions = [json.loads(line) for line in (out / "eval_questions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert trained == set(moderns) - val and len(questions) == 2 and {q["reference"] for q in questions} <= val
    (tmp_path / "meta.json").write_text(json.dumps({"val_fraction": 0.0, "seed": 3}))  # no validation document
    p = run_script("sft_data_process.py", f"--inputs={pairs}", "--eval_holdout=2", f"--out_dir={tmp_path / 'none'}",
                   f"--heldout_corpus={tmp_path / 'clean.parquet'}", f"--token_meta={tmp_path / 'meta.json'}",
                   check=False)
    assert p.returncode == 1 and "no conversation to hold out" in p.stderr and not (tmp_path / "none").exists()
