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
