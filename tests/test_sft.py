"""sft.py as users run it: a tiny model learns a few conversations verbatim, full and LoRA runs resume
exactly (LoRA's rank, alpha and targets coming back from the checkpoint), packed rows give the loss of padded
batches, and checkpoints are written when always_save_checkpoint says."""
import json
import os

from conftest import run_script
import numpy as np
import pytest
from sft_fixtures import tiny_tokenizer
import torch

from babyllama import chat_batches, checkpoint as ck, models, runlog
from babyllama.generate import generate
from model import ModelArgs, Transformer
from tokenizer.chat_template import decode_reply, encode_conversation, encode_prompt, stop_ids

U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
CONVS = [
    {"system": None, "messages": [U("《静夜思》的作者是谁？"), A("《静夜思》的作者是李白。")]},
    {"system": None, "messages": [U("续写：床前明月光，"), A("疑是地上霜。举头望明月，低头思故乡。")]},
    {"system": "你是助手。", "messages": [U("你好"), A("你好，我是助手。")]},
    {"system": None, "messages": [U("请写一首题为《登鹳雀楼》的诗。"), A("白日依山尽，黄河入海流。"),
                                  U("这首诗的作者是谁？"), A("王之涣。")]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    tok = tiny_tokenizer(d)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=tok.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**args))
    ck.save(str(d / "base.pt"), {"model": model.state_dict(), "model_args": args, "iter_num": 0,
                                            "config": {}, "tokenizer": tok.model_path})
    for name in ("train", "val"):
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for c in CONVS:
                f.write(json.dumps(dict(c, source="test"), ensure_ascii=False) + "\n")
    return d, tok


def run_sft(d, out, *extra, check=True, plots=False):
    p = run_script("sft.py", f"--init_ckpt={d / 'base.pt'}", f"--train_data={d / 'train.jsonl'}",
                   f"--val_data={d / 'val.jsonl'}", f"--out_dir={out}", "--batch_size=2", "--num_threads=1",
                   "--log_interval=1", "--dtype=float32", "--device=cpu", *extra, check=check, plots=plots)
    return p.stdout if check else p


def answers(model, tok, conv):
    """Greedy reply to every user turn, given the reference history before it."""
    out = []
    for k in range(0, len(conv["messages"]), 2):
        prompt = encode_prompt(tok, conv["messages"][:k + 1], conv["system"])
        ids = generate(model, torch.tensor([prompt]), 40, temperature=0.0, stop_ids=stop_ids(tok))[0]
        assert ids[-1] == tok.end_id  # the reply ends with the end-of-turn token
        out.append(decode_reply(tok, ids))
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_tiny_model_learns_conversations_verbatim(setup, tmp_path, mode):
    d, tok = setup
    extra = ["--lora_rank=16", "--lora_alpha=32", "--learning_rate=1e-2"] if mode == "lora" else \
        ["--learning_rate=3e-3"]
    out = run_sft(d, tmp_path, "--max_iters=120", "--warmup_iters=5", "--min_lr=1e-4", "--eval_interval=60",
                  "--pack=True", *extra, plots=True)
    assert "val loss" in out and os.path.exists(tmp_path / "loss.png")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    if mode == "lora":
        assert "model" not in ckpt and ckpt["lora"] and all("lora_" in k for k in ckpt["lora"])
    model, _ = models.load_model(str(tmp_path / "ckpt.pt"))  # base + adapter, merged
    model.eval()
    for conv in CONVS:
        assert answers(model, tok, conv) == [m["content"] for m in conv["messages"][1::2]]
    if mode == "full":  # eval.py chat: batch mode and the interactive loop
        q = tmp_path / "q.txt"
        q.write_text("《静夜思》的作者是谁？\n你好\n", encoding="utf-8")
        run_script("eval.py", "--mode=chat", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--questions_file={q}",
                   f"--answers_file={tmp_path / 'a.jsonl'}", "--temperature=0.0", "--max_new_tokens=30")
        got = [json.loads(l)["answer"] for l in open(tmp_path / "a.jsonl", encoding="utf-8")]
        assert got[0] == "《静夜思》的作者是李白。"
        p = run_script("eval.py", "--mode=chat", f"--ckpt_path={tmp_path / 'ckpt.pt'}", "--temperature=0.0",
                       "--max_new_tokens=30", input="《静夜思》的作者是谁？\n/reset\n/quit\n")
        assert "助手> 《静夜思》的作者是李白。" in p.stdout and "conversation cleared" in p.stdout
    if mode == "lora":  # merged.pt is a plain checkpoint with the same weights
        merged, _ = models.load_model(str(tmp_path / "merged.pt"))
        x = torch.tensor([encode_conversation(tok, CONVS[3]["messages"])[0]])
        assert (merged(x)[0] - model(x)[0]).abs().max().item() <= 1e-5


def losses(out):
    return {r["iter"]: r["loss"] for r in runlog.read_jsonl(out / "log.jsonl") if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_matches_uninterrupted_run(setup, tmp_path, mode):
    """The resumed run is given only the schedule: LoRA's rank, alpha, dropout and targets (not the defaults
    8, 16, 0, all seven) and the context length come back from the checkpoint."""
    d, _ = setup
    common = ["--lr_decay_iters=8", "--eval_interval=3", "--gradient_accumulation_steps=2", "--dropout=0.1",
              "--learning_rate=3e-3", "--warmup_iters=2"]
    shape = ["--max_seq_len=48"]
    if mode == "lora":
        shape += ["--lora_rank=4", "--lora_alpha=4.0", "--lora_dropout=0.1", "--lora_targets=wq,wv,w2"]
    run_sft(d, tmp_path / "straight", "--max_iters=8", *common, *shape)
    run_sft(d, tmp_path / "stopped", "--max_iters=4", *common, *shape)
    run_sft(d, tmp_path / "stopped", "--max_iters=8", "--init_from=resume", *common)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == sorted(b) == list(range(8))
    for it in a:
        assert abs(a[it] - b[it]) <= 1e-6, (it, a[it], b[it])
    assert a[7] < a[0]
    key = "lora" if mode == "lora" else "model"
    w1 = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)[key]
    w2 = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)[key]
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=0), k
    ckpt = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["max_seq_len"] == 48 and ckpt["config"]["max_seq_len"] == 48
    if mode == "lora":
        assert ckpt["lora_config"] == {"rank": 4, "alpha": 4.0, "dropout": 0.1, "targets": ["wq", "wv", "w2"]}
        assert ckpt["config"]["lora_alpha"] == 4.0 and ckpt["config"]["lora_targets"] == "wq,wv,w2"
        # asking a resumed run for other adapters is refused, naming the setting, and writes nothing
        p = run_sft(d, tmp_path / "stopped", "--max_iters=9", "--init_from=resume", "--lora_alpha=32.0", *common,
                    check=False)
        assert p.returncode != 0 and "lora_alpha=32.0" in p.stderr
        assert torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)["iter_num"] == 8


def saves(out):
    """The iterations at which the run wrote its checkpoint (the log records each write)."""
    return [r["iter"] for r in runlog.read_jsonl(out / "log.jsonl") if "checkpoint" in r]


@pytest.mark.parametrize("always", [True, False])
def test_always_save_checkpoint(setup, tmp_path, always):
    """learning_rate 0: the held-out loss never improves after the first evaluation. always_save_checkpoint
    writes at every evaluation after the start; otherwise only the final state is written."""
    d, _ = setup
    run_sft(d, tmp_path, "--max_iters=4", "--eval_interval=2", "--learning_rate=0.0", "--min_lr=0.0",
            f"--always_save_checkpoint={always}")
    assert saves(tmp_path) == ([2, 4] if always else [4])


def test_packed_rows_give_the_loss_of_padded_batches(setup):
    d, tok = setup
    samples = [tuple(np.array(v) for v in encode_conversation(tok, c["messages"], c["system"])) for c in CONVS]
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    padded = chat_batches.collate_padded(samples, 0)
    loss_pad = model(padded["x"], padded["y"])[1]
    max_seq_len = sum(len(s[0]) for s in samples) + 4  # one row holding all four, plus padding
    packed = chat_batches.collate_packed([samples], max_seq_len, 0)
    assert packed["n_tokens"] == padded["n_tokens"]
    loss_packed = chat_batches.PackedLM(model)(packed["x"], packed["y"], packed["pos"], packed["mask"])[1]
    assert abs(loss_pad.item() - loss_packed.item()) <= 1e-5
    # without the block-diagonal mask and restarted positions the samples would see each other
    leaky = model(packed["x"], packed["y"])[1]
    assert abs(leaky.item() - loss_pad.item()) > 1e-4
    # greedy packing never splits a sample and respects the row length
    rows = chat_batches.pack_rows(range(len(samples)), [len(s[0]) for s in samples], 39)  # rows of <= 40 tokens
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3]
    assert all(sum(len(samples[i][0]) for i in r) <= 40 or len(r) == 1 for r in rows)
