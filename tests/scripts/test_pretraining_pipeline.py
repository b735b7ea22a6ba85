"""The pretraining pipeline as a user runs it, on a small corpus written here: python -m tokenizer -> data_process.py
-> pretrain.py (a few iterations) -> eval.py (samples and val loss)."""
import json
import math
import os

from conftest import run_script

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
       "--learning_rate=3e-3", "--warmup_iters=5", "--num_threads=1")
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert val[-1] < val[0] < math.log(400) + 0.5  # it learned something
    text = sh("eval.py", f"--ckpt_path={out / 'ckpt.pt'}", "--mode=all", f"--val_data={data / 'val.bin'}",
              "--prompts=['床前明月光，']", "--max_new_tokens=12", "--temperature=0.0")
    assert "--- 床前明月光，" in text
    assert "| loss (nats/token) | perplexity | bits/character |" in text
    # the checkpoint names its tokenizer, so eval needed no --tokenizer_model
    assert os.path.exists(f"{prefix}.model")
