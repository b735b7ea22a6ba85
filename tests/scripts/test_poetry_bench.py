"""poetry_bench.py, the demo's multiple-choice benchmark: every question and example comes from a held-out poem (the
token files' split rule, babyllama/split.py), its right option is the poem's author or next line, and the wrong
options look like the right one."""
import json
import random

from conftest import run_script
import pyarrow as pa
import pyarrow.parquet as pq

from babyllama.mc import LETTERS, load_exam
from babyllama.split import is_val


def test_poetry_benchmark_uses_only_held_out_poems(tmp_path):
    rng = random.Random(0)
    chars = "春夏秋冬山水风月花鸟云雨天地江河日夜人心"
    rows = []
    for i in range(400):
        lines = ["".join(rng.choice(chars) for _ in range(5)) + "，" + "".join(rng.choice(chars) for _ in range(5)) + "。"
                 for _ in range(4)]
        title, author = f"题{i}", f"诗人{i % 9}"
        rows.append({"text": "\n".join([title, author] + lines), "title": title, "author": author})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "clean.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"val_fraction": 0.3, "seed": 7}))
    run_script("poetry_bench.py", f"--corpus={tmp_path / 'clean.parquet'}",
               f"--token_meta={tmp_path / 'meta.json'}", f"--out_dir={tmp_path / 'b'}", "--n_val=20", "--n_dev=3")
    held = {r["title"]: r for r in rows if is_val(r["text"], 0.3, 7)}
    assert 60 < len(held) < 180
    exam = load_exam(str(tmp_path / "b"), "val", k_shot=3)
    for subject, part in exam.items():
        assert len(part["questions"]) == 20 and len(part["shots"]) == 3
        for q in part["questions"] + part["shots"]:
            title = q["question"].split("》")[0].lstrip("《")
            poem = held[title]  # every question comes from a held-out document
            right = q["options"][LETTERS.index(q["answer"])]
            if subject == "author":
                assert right == poem["author"] and len(set(q["options"])) == 4
            else:
                shown = q["question"].split("\n")[1:]
                lines = poem["text"].split("\n")[2:]
                assert lines[:len(shown)] == shown and right == lines[len(shown)]
                assert {len(o) for o in q["options"]} == {len(right)} and len(set(q["options"])) == 4



def test_prose_cloze_asks_for_the_next_sentence_of_held_out_documents_only(tmp_path):
    rng = random.Random(1)
    chars = "我们今天明天去学校工作医生病人城市农村经济发展中国人民生活"
    sentence = lambda n: "".join(rng.choice(chars) for _ in range(n)) + "。"  # noqa: E731
    rows = [{"text": "".join(sentence(rng.choice([9, 12, 15])) for _ in range(5)), "title": None, "author": None}
            for _ in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "clean.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"val_fraction": 0.3, "seed": 7}))
    run_script("poetry_bench.py", "--kind=prose", f"--corpus={tmp_path / 'clean.parquet'}",
               f"--token_meta={tmp_path / 'meta.json'}", f"--out_dir={tmp_path / 'b'}", "--n_val=30", "--n_dev=3")
    held = [r["text"] for r in rows if is_val(r["text"], 0.3, 7)]
    exam = load_exam(str(tmp_path / "b"), "val", k_shot=3)
    assert list(exam) == ["next_sentence"]
    part = exam["next_sentence"]
    assert len(part["questions"]) == 30 and len(part["shots"]) == 3
    for q in part["questions"] + part["shots"]:
        right = q["options"][LETTERS.index(q["answer"])]
        doc = next(t for t in held if t.startswith(q["question"]))  # the shown sentences open a held-out document
        assert doc[len(q["question"]):].startswith(right) and right.endswith("。")
        assert {len(o) for o in q["options"]} == {len(right)} and len(set(q["options"])) == 4
        assert 1 <= q["question"].count("。") <= 3
    answers = [q["answer"] for q in part["questions"]]
    assert len(set(answers)) > 1  # the right letter is drawn, not fixed
