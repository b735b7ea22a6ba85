"""dpo_data_process.py as users run it: the demo preference set built from a poetry folder and counted
(--count), and a set without training pairs (every poem held out) refused with nothing written."""
import json

from conftest import QUATRAINS, run_script, write_poems

from babyllama.preferences import load_preferences


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


def test_dpo_demo_refuses_a_set_without_training_pairs_and_writes_nothing(tmp_path):
    poetry = write_poems(tmp_path / "poet.tang.0.json", QUATRAINS[:2])
    out = tmp_path / "out"
    p = run_script("dpo_data_process.py", f"--demo_poetry={poetry}", "--demo_glob=", f"--out_dir={out}",
                   "--demo_val_poems=5", check=False, timeout=60)  # both poems held out: no training pair
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"no training pair from {poetry}: all 2 poems used are held out" in p.stderr
    assert not out.exists()


def test_mismatched_pairs_prefer_the_own_reply_over_another_question_of_the_same_source(tmp_path):
    from conftest import write_jsonl
    convs = [{"messages": [{"role": "user", "content": f"{src}问{i}"}, {"role": "assistant", "content": f"{src}答{i}"}],
              "system": None, "source": src} for src in ("doctor.csv", "pairs.jsonl", "alpaca.json") for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", convs)
    out = tmp_path / "out"
    run_script("dpo_data_process.py", f"--mismatched={tmp_path / 'train.jsonl'}",
               "--mismatched_sources=doctor.csv,pairs.jsonl", "--mismatched_pairs=20", "--mismatched_val=4",
               f"--out_dir={out}", timeout=60)
    train, _ = load_preferences(str(out / "train.jsonl"))
    val, _ = load_preferences(str(out / "val.jsonl"))
    assert len(val) == 4 and 10 <= len(train) <= 16  # 20 drawn, a draw of the conversation itself gives no pair
    for p in train + val:
        question = p["prompt"][0]["content"]
        source, i = question.split("问")
        assert source in ("doctor.csv", "pairs.jsonl") and p["chosen"] == f"{source}答{i}"
        assert p["rejected"].startswith(f"{source}答") and p["rejected"] != p["chosen"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"] == len(train) and sum(stats["per_source"].values()) == len(train)
    p = run_script("dpo_data_process.py", f"--mismatched={tmp_path / 'train.jsonl'}", "--mismatched_sources=nowhere.csv",
                   f"--out_dir={tmp_path / 'none'}", check=False, timeout=60)
    assert p.returncode == 1 and "no conversation from nowhere.csv" in p.stderr and not (tmp_path / "none").exists()
