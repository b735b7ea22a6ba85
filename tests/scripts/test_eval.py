"""eval.py as users run it: unknown modes, files that are not token files and another tokenizer are refused by
name; the chat batch skips records without a question and answers the rest; perplexity and bits per character on
text and on a token file; the gen mode's scores and rows; a
bad exam file is refused before a model loads; the report has its sections. (The measurements themselves, in one
process: tests/unit/test_mc.py, test_scoring.py, test_text_metrics.py, test_contamination.py.)"""
import json
import math

from conftest import TEXTS, run_script, save_tiny_ckpt, write_csv
import numpy as np
import pytest

from babyllama import runlog, text_metrics
from tokenizer.train_tokenizer import train_tokenizer


def test_eval_refuses_unknown_modes_token_files_that_are_not_and_another_tokenizer(chat_files, tmp_path):
    base = str(chat_files / "base.pt")
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=samples", check=False)
    assert p.returncode != 0 and "mode must be one of" in p.stderr and "'samples'" in p.stderr
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=report", "--run_dir=out/demo", check=False)
    assert p.returncode != 0 and "is now `python report.py`" in p.stderr  # (contamination.py's the same way)
    (tmp_path / "labels.jsonl").write_text('{"label": 1}\n{"label": 0}\n')
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=loss", f"--val_data={tmp_path / 'labels.jsonl'}",
                   check=False)
    # records without text: the file and its first skipped line are named, and what ppl reads
    assert p.returncode != 0 and "labels.jsonl:1: no text field" in p.stderr and ".bin" in p.stderr
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


def test_mc_mode_refuses_a_bad_file_before_loading_a_model(tmp_path):
    write_csv(tmp_path / "x" / "val" / "s_val.csv", [(0, "问", "1", "2", "3", "4", "5")])
    p = run_script("eval.py", "--mode=mc", "--ckpt_path=/nonexistent/ckpt.pt", f"--mc_data={tmp_path / 'x'}",
                   check=False)
    assert p.returncode != 0 and "s_val.csv, row 2: answer '5' is not one of A, B, C, D" in p.stderr

