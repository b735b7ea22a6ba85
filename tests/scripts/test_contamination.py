"""contamination.py: the evaluation items a training document nearly contains, and eval.py's mc mode counting
them. (The comparison itself, in one process: tests/unit/test_contamination.py.)"""
import json

from conftest import run_script, save_tiny_ckpt, write_exam


def test_contamination_flags_items_and_eval_mc_counts_them(tiny_tok, tmp_path):
    d = write_exam(tmp_path / "exam", subjects=("poems",))
    corpus = tmp_path / "train.txt"
    corpus.write_text("白日依山尽的下一句\n疑是地上霜\n黄河入海流\n处处闻啼鸟\n花落知多少\n无关的一行字\n", encoding="utf-8")
    run_script("contamination.py", f"--eval_set={d}", f"--train_data={corpus}", "--threshold=0.3")
    r = json.loads((d / "contamination.json").read_text(encoding="utf-8"))
    assert r["items"] == 5 and r["training_documents"] == 6
    # a one-line document holds at most the question's 5 shingles of an item's 25: none flagged
    assert r["flagged"] == 0
    corpus.write_text("白日依山尽的下一句：疑是地上霜，黄河入海流，处处闻啼鸟，花落知多少\n", encoding="utf-8")
    run_script("contamination.py", f"--eval_set={d}", f"--train_data={corpus}", "--threshold=0.9")
    r = json.loads((d / "contamination.json").read_text(encoding="utf-8"))
    assert [h["key"] for h in r["flagged_items"]] == ["poems/1"]
    save_tiny_ckpt(tiny_tok, tmp_path / "ckpt.pt")
    run_script("eval.py", "--mode=mc", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--mc_data={d}",
               f"--contamination_file={d / 'contamination.json'}", f"--results_file={tmp_path / 'mc.json'}")
    mc = json.loads((tmp_path / "mc.json").read_text(encoding="utf-8"))
    assert mc["contaminated"] == 1 and "1 of 5 questions have a near-duplicate" in mc["markdown"]
