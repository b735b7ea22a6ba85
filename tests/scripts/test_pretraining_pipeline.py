"""The pipeline as a user runs it, on a small corpus written here: python -m tokenizer -> data_process.py ->
pretrain.py (a few iterations) -> eval.py (samples and val loss); and an imported model with its own byte-level
tokenizer from import through fine-tuning to serving."""
import json
import math
import os

import pytest
import torch

from babyllama import runlog
from conftest import CONVERSATIONS, PAIRS, raw, run_script, start_server, stop_server, write_jsonl
from hf_models import hf_random_folder
from tokenizer import Tokenizer

LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽，黄河入海流。",
         "欲穷千里目，更上一层楼。", "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。",
         "The quick brown fox jumps over the lazy dog.", "2026年11月21日，天气晴。"]


def sh(*args):
    return run_script(*args, timeout=600).stdout


def test_tokenizer_data_process_pretrain_eval(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(400):  # documents of two to four lines, in varying order
            doc = "\n".join(LINES[(i * k) % len(LINES)] for k in range(1, 2 + i % 3))
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    prefix = tmp_path / "tok"
    sh("-m", "tokenizer", f"--input={corpus}", "--vocab_size=400", f"--model_prefix={prefix}")
    data = tmp_path / "data"
    sh("data_process.py", f"--input={corpus}", f"--tokenizer_model={prefix}.model", f"--out_dir={data}",
       "--val_fraction=0.1", "--num_workers=1")
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 400
    out = tmp_path / "run"
    sh("pretrain.py", f"--train_data={data / 'train.bin'}", f"--val_data={data / 'val.bin'}", f"--out_dir={out}",
       "--dim=64", "--n_layers=2", "--n_heads=4", "--max_seq_len=64", "--batch_size=4",
       "--gradient_accumulation_steps=1", "--max_iters=30", "--eval_interval=15", "--eval_iters=2",
       "--learning_rate=3e-3", "--warmup_iters=5", "--num_threads=1", "--compile=False")
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < val[0] < math.log(400) + 0.5  # it learned something
    text = sh("eval.py", f"--ckpt_path={out / 'ckpt.pt'}", "--mode=all", f"--val_data={data / 'val.bin'}",
              "--prompts=['床前明月光，']", "--max_new_tokens=12", "--temperature=0.0")
    assert "--- 床前明月光，" in text
    assert "| loss (nats/token) | perplexity | bits/character |" in text
    # the checkpoint names its tokenizer, so eval needed no --tokenizer_model
    assert os.path.exists(f"{prefix}.model")


def test_an_imported_qwen2_with_its_byte_level_tokenizer_goes_through_sft_dpo_eval_and_serve(qwen2_json, tmp_path):
    """A Qwen2 folder made by transformers (random weights, padded vocabulary) with a byte-level BPE in Qwen2's
    pipeline: export.py imports it, sft.py and dpo.py fine-tune it, eval.py answers a question, serve.py answers a
    request. (Its tokenizer.json through data_process.py and pretrain.py: test_pretrain.py's uint32 corpus and
    test_export.py's continued pretraining; written back by export: test_export.py.)"""
    pytest.importorskip("transformers")
    hf_random_folder(qwen2_json, "qwen2", tmp_path / "src", pad=16)
    imp = tmp_path / "imported"
    sh("export.py", f"--import_from={tmp_path / 'src'}", f"--out_dir={imp}")
    tok = Tokenizer(str(imp / "tokenizer.json"))
    assert tok.kind == "byte-level-bpe" and torch.load(imp / "ckpt.pt")["model_args"]["vocab_size"] == tok.vocab_size
    train = ["--max_iters=2", "--eval_interval=100", "--batch_size=2", "--gradient_accumulation_steps=1",
             "--warmup_iters=0", "--learning_rate=1e-3", "--num_threads=1", "--dtype=float32", "--val_data="]
    write_jsonl(tmp_path / "train.jsonl", [dict(c, source="t") for c in CONVERSATIONS])
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    sh("sft.py", f"--init_ckpt={imp / 'ckpt.pt'}", f"--train_data={tmp_path / 'train.jsonl'}",
       f"--out_dir={tmp_path / 'sft'}", *train)
    sh("dpo.py", f"--init_ckpt={tmp_path / 'sft' / 'ckpt.pt'}", f"--train_data={tmp_path / 'pairs.jsonl'}",
       f"--out_dir={tmp_path / 'dpo'}", *train)
    dpo = tmp_path / "dpo" / "ckpt.pt"
    write_jsonl(tmp_path / "q.jsonl", [{"question": "《静夜思》的作者是谁？"}])
    sh("eval.py", "--mode=chat", f"--ckpt_path={dpo}", f"--questions_file={tmp_path / 'q.jsonl'}",
       f"--answers_file={tmp_path / 'a.jsonl'}", "--max_new_tokens=4", "--temperature=0.0")
    assert len(runlog.read_jsonl(str(tmp_path / "a.jsonl"))) == 1
    proc, port = start_server(str(dpo))
    try:
        status, body, _ = raw(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0})
    finally:
        stop_server(proc)
    assert status == 200 and body["usage"]["completion_tokens"] <= 4
