"""eval.py as users run it: unknown modes, files that are not token files and another tokenizer are refused by
name; the chat batch skips records without a question and answers the rest; perplexity and bits per character on
text and on a token file; the gen mode's scores and rows; the contamination mode flags items and mc counts them; a
bad exam file is refused before a model loads; the report has its sections. (The measurements themselves, in one
process: tests/unit/test_mc.py, test_scoring.py, test_text_metrics.py, test_contamination.py.)"""
import json
import math
import os

from conftest import TEXTS, run_script, tiny_model, write_csv, write_exam
import numpy as np
import pytest

from babyllama import runlog, text_metrics
from babyllama.models import save_merged
from tokenizer.train_tokenizer import train_tokenizer


def save_tiny_ckpt(tok, path):
    """A checkpoint of a tiny model for tok's vocabulary (a context of 16 tokens) at path."""
    model = tiny_model(0, dim=32, vocab_size=tok.vocab_size, max_seq_len=16)
    save_merged(str(path), model, iter_num=0, config={}, tokenizer=tok.model_path, tokenizer_sha256=tok.sha256())


def test_eval_refuses_unknown_modes_token_files_that_are_not_and_another_tokenizer(chat_files, tmp_path):
    base = str(chat_files / "base.pt")
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=samples", check=False)
    assert p.returncode != 0 and "mode must be one of" in p.stderr and "'samples'" in p.stderr
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=loss", f"--val_data={chat_files / 'train.jsonl'}",
                   check=False)
    # conversations are not text documents: the file and its first skipped line are named, and what ppl reads
    assert p.returncode != 0 and "train.jsonl:1: no text field" in p.stderr and ".bin" in p.stderr
    other = train_tokenizer(iter([t[::-1] for t in TEXTS]), str(tmp_path / "other"), 400, num_threads=1,
                            verbose=False)  # the same characters and size, other merges: another tokenizer
    p = run_script("eval.py", f"--ckpt_path={base}", f"--tokenizer_model={other}", "--max_new_tokens=4",
                   check=False)
    assert p.returncode != 0 and "sha256" in p.stderr


def test_chat_batch_skips_records_without_a_question_and_answers_the_rest(chat_files, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "你好"}\n{"prompt": "no question key"}\n{"question": "《静夜思》的作者是谁？"}\n',
                 encoding="utf-8")
    p = run_script("eval.py", "--mode=chat", f"--ckpt_path={chat_files / 'base.pt'}", f"--questions_file={q}",
                   f"--answers_file={tmp_path / 'a.jsonl'}", "--max_new_tokens=4", "--temperature=0.0")
    answers = runlog.read_jsonl(str(tmp_path / "a.jsonl"))
    assert [a["question"] for a in answers] == ["你好", "《静夜思》的作者是谁？"]
    assert "q.jsonl:2" in p.stdout and "no question" in p.stdout


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(obj, list):
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in obj))
        else:
            json.dump(obj, f, ensure_ascii=False)


def mc_result(avg_letter, avg_option):
    subj = lambda a: {"subjects": {"next_line": a - 0.05, "author": a + 0.05}, "categories": {"poetry": a},
                      "average": a, "questions": 1000}
    return dict(benchmark="poetry_bench", split="val", k_shot=0, questions=1000, contaminated=3,
                scores={"letter": subj(avg_letter), "option": subj(avg_option)})


def test_report_has_the_losses_curves_evaluations_scores_samples_and_files(tmp_path):
    d = tmp_path / "demo"
    run_s = dict(train_tokens=1_000_000, train_seconds=120.0, warmup_seconds=3.0, tokens_per_sec=8333.3)
    write(f"{d}/stages.jsonl", [{"stage": "pretrain", "seconds": 125.0}, {"stage": "sft", "seconds": 60.0}])
    write(f"{d}/pretrain/summary.json", dict(iter=500, params=6_100_000, best_val_loss=5.4321, **run_s))
    write(f"{d}/pretrain/eval.json", dict(val_loss=5.5, perplexity=244.7, val_tokens=150_000,
                                          samples=[{"prompt": "白日依山尽，", "completion": "黄河入海流。"}]))
    write(f"{d}/sft/summary.json", dict(iter=300, best_val_loss=3.2109, **run_s))
    poem = {"n": 200, "exact_match": 0.0, "finished": 0.99, "well_formed": 0.875}
    write(f"{d}/sft/chat.json", {"chat_scores": {"poem": poem, "author": {"n": 200, "exact_match": 0.01,
                                                                          "author_named": 0.02}}})
    write(f"{d}/pretrain/chat.json", {"chat_scores": {"poem": dict(poem, well_formed=0.0)}})
    write(f"{d}/sft/answers.jsonl", [{"kind": "poem", "question": "请写一首题为《春》的诗。", "answer": "春风吹绿柳，"}])
    write(f"{d}/dpo/summary.json", dict(iter=80, held_out={"pairs": 100, "before": {"logps/accuracy": 0.66,
          "logps/margin": 1.0}, "after": {"logps/accuracy": 0.71, "logps/margin": 2.0}}, **run_s))
    write(f"{d}/pretrain/eval_mc_poetry_bench_val_0shot.json", mc_result(0.25, 0.40))
    write(f"{d}/sft/eval_mc_poetry_bench_val_0shot.json", mc_result(0.30, 0.45))
    write(f"{d}/pretrain/eval_ppl.json", dict(val_data="v.bin", val_tokens=1000, val_loss=5.0, perplexity=148.4,
                                              bits_per_char=3.21))
    write(f"{d}/bench/contamination.json", dict(eval_set="bench", markdown="| flagged table |"))
    (d / "pretrain" / "loss.png").write_bytes(b"png")
    run_script("eval.py", "--mode=report", f"--run_dir={d}")
    text = (d / "report.md").read_text(encoding="utf-8")
    for section in ("## Wall time per stage", "## Training", "## Curves", "## Evaluations", "## Held-out scores",
                    "## Continuations", "## Chat answers after SFT", "## Files"):
        assert section in text, section
    assert "![pretraining loss](pretrain/loss.png)" in text and "sft/loss.png" not in text  # only plots that exist
    assert "| pretrained | letter | 30.0 | 20.0 | 25.0 |" in text  # subjects sorted: author, next_line; average
    assert "| after SFT | option | 50.0 | 40.0 | 45.0 |" in text and "chance is 25%" in text
    assert "| pretrained | v.bin | 1,000 | 5.0000 | 148.40 | 3.2100 |" in text
    assert "| flagged table |" in text and "near-duplicate in the training data: 3 of 1000" in text
    assert "| pretraining | 500 | 1,000,000 |" in text and "5.4321" in text and "3.2109" in text  # losses
    assert "val loss 5.5000" in text and "6.10M-parameter" in text
    assert "| after SFT | 87.5% |" in text and "| base (before SFT) | 0.0% |" in text  # scores
    assert "66.0% before -> 71.0% after" in text
    assert "白日依山尽，**黄河入海流。**" in text and "春风吹绿柳" in text  # samples
    assert "**3.1 min**" in text  # 185 s of stages


def test_ppl_on_text_reports_bits_per_character_from_loss_tokens_and_characters(tiny_tok, tmp_path):
    save_tiny_ckpt(tiny_tok, tmp_path / "ckpt.pt")
    docs = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽", "What is two plus two?"]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    run_script("eval.py", "--mode=ppl", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--val_data={tmp_path / 't.txt'}",
               "--stride=5", f"--results_file={tmp_path / 'r.json'}")
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert r["characters"] == sum(len(d) for d in docs) == 24 + 5 + 21
    assert r["val_tokens"] == sum(len(tiny_tok.encode(d)) + 1 for d in docs)  # each token and the closing eos
    assert r["bits_per_char"] == pytest.approx(r["val_loss"] * r["val_tokens"] / (r["characters"] * math.log(2)))
    assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))


def test_ppl_on_a_token_file_counts_the_characters_of_its_documents(tiny_tok, tmp_path):
    save_tiny_ckpt(tiny_tok, tmp_path / "ckpt.pt")
    docs = ["床前明月光", "疑是地上霜。", "Hello!"]
    ids = [t for d in docs for t in tiny_tok.encode(d) + [tiny_tok.eos_id]]
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": tiny_tok.vocab_size,
                                                    "tokenizer_sha256": tiny_tok.sha256()}))
    run_script("eval.py", "--mode=ppl", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--val_data={tmp_path / 'val.bin'}",
               "--val_max_tokens=0", f"--results_file={tmp_path / 'r.json'}")
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    # every token is scored (the first after an eos, as data_process's documents are; the eos closing each
    # document too); the characters are the texts'
    assert r["val_tokens"] == len(ids) and r["characters"] == 5 + 6 + 6 and r["documents"] == 3


def test_gen_mode_writes_scores_and_per_sample_rows(tiny_tok, tmp_path):
    save_tiny_ckpt(tiny_tok, tmp_path / "ckpt.pt")
    items = [{"prompt": "床前明月光，", "reference": "疑是地上霜。"},
             {"messages": [{"role": "user", "content": "你好"}], "reference": "你好，我是助手。"}, {"bad": 1},
             {"messages": ["你好"], "reference": "x"}, {"messages": [{"role": "assistant", "content": "a"}], "reference": "x"}]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(i, ensure_ascii=False) for i in items), encoding="utf-8")
    p = run_script("eval.py", "--mode=gen", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--gen_file={tmp_path / 'g.jsonl'}",
                   "--max_new_tokens=4", "--temperature=0.0", f"--results_file={tmp_path / 'r.json'}")
    assert "g.jsonl:3: no prompt/messages or reference" in p.stdout
    assert "g.jsonl:4: bad messages" in p.stdout and "g.jsonl:5: bad messages" in p.stdout
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in open(r["samples"], encoding="utf-8")]
    assert len(rows) == 2 and {"bleu4", "rougeL", "answer"} <= set(rows[0])
    again = text_metrics.corpus_scores([x["answer"] for x in rows], [x["reference"] for x in rows])
    assert r["scores"] == pytest.approx(again)
    assert "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L |" in r["markdown"]


def test_contamination_mode_flags_items_and_mc_counts_them(tiny_tok, tmp_path):
    d = write_exam(tmp_path / "exam", subjects=("poems",))
    corpus = tmp_path / "train.txt"
    corpus.write_text("白日依山尽的下一句\n疑是地上霜\n黄河入海流\n处处闻啼鸟\n花落知多少\n无关的一行字\n", encoding="utf-8")
    run_script("eval.py", "--mode=contamination", f"--eval_set={d}", f"--train_data={corpus}", "--threshold=0.3")
    r = json.loads((d / "contamination.json").read_text(encoding="utf-8"))
    assert r["items"] == 5 and r["training_documents"] == 6
    # a one-line document holds at most the question's 5 shingles of an item's 25: none flagged
    assert r["flagged"] == 0
    corpus.write_text("白日依山尽的下一句：疑是地上霜，黄河入海流，处处闻啼鸟，花落知多少\n", encoding="utf-8")
    run_script("eval.py", "--mode=contamination", f"--eval_set={d}", f"--train_data={corpus}", "--threshold=0.9")
    r = json.loads((d / "contamination.json").read_text(encoding="utf-8"))
    assert [h["key"] for h in r["flagged_items"]] == ["poems/1"]
    save_tiny_ckpt(tiny_tok, tmp_path / "ckpt.pt")
    run_script("eval.py", "--mode=mc", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--mc_data={d}",
               f"--contamination_file={d / 'contamination.json'}", f"--results_file={tmp_path / 'mc.json'}")
    mc = json.loads((tmp_path / "mc.json").read_text(encoding="utf-8"))
    assert mc["contaminated"] == 1 and "1 of 5 questions have a near-duplicate" in mc["markdown"]


def test_mc_mode_refuses_a_bad_file_before_loading_a_model(tmp_path):
    write_csv(tmp_path / "x" / "val" / "s_val.csv", [(0, "问", "1", "2", "3", "4", "5")])
    p = run_script("eval.py", "--mode=mc", "--ckpt_path=/nonexistent/ckpt.pt", f"--mc_data={tmp_path / 'x'}",
                   check=False)
    assert p.returncode != 0 and "s_val.csv, row 2: answer '5' is not one of A, B, C, D" in p.stderr

