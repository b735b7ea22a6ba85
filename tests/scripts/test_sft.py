"""sft.py as users run it: a tiny model learns a few conversations verbatim (eval.py's chat answers them), full and
LoRA runs resume exactly (LoRA's rank, alpha and targets coming back from the checkpoint), checkpoints are written
when always_save_checkpoint says, the gradient does not depend on how a batch is split (two processes included),
FSDP with LoRA gives the run of one process, a diverged run keeps the good checkpoint, empty data is an error (not
a hang), --help lists the settings, and a run folder moved elsewhere still finds its tokenizer."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from babyllama import checkpoint as ck, models
from babyllama.generate import generate
from conftest import (CONVERSATIONS, CPU, ENV, ROOT, TEXTS, TWO_PROCESSES,
                      assert_same_gradient_however_the_batch_is_split, assert_same_run, finetune, raw, run_script,
                      saved_at, start_server, stop_server, tiny_tokenizer, train_losses, write_chat_files)
from tokenizer.chat_template import decode_reply, encode_conversation, encode_prompt, stop_ids
from tokenizer.train_tokenizer import train_tokenizer


def run_sft(d, out, *extra, check=True, plots=False):
    """sft.py from d's base.pt on its conversations, held out: the same conversations."""
    p = run_script("sft.py", f"--init_ckpt={d / 'base.pt'}", f"--train_data={d / 'train.jsonl'}",
                   f"--val_data={d / 'train.jsonl'}", f"--out_dir={out}", "--batch_size=2", "--log_interval=1", *CPU,
                   *extra, check=check, plots=plots)
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
def test_tiny_model_learns_conversations_verbatim(chat_files, tiny_tok, tmp_path, mode):
    d, tok = chat_files, tiny_tok
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
    for conv in CONVERSATIONS:
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
        x = torch.tensor([encode_conversation(tok, CONVERSATIONS[3]["messages"])[0]])
        assert (merged(x)[0] - model(x)[0]).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_matches_uninterrupted_run(chat_files, tmp_path, mode):
    """The resumed run is given only the schedule: LoRA's rank, alpha, dropout and targets (not the defaults
    8, 16, 0, all seven) and the context length come back from the checkpoint."""
    d = chat_files
    common = ["--lr_decay_iters=8", "--eval_interval=3", "--gradient_accumulation_steps=2", "--dropout=0.1",
              "--learning_rate=3e-3", "--warmup_iters=2"]
    shape = ["--max_seq_len=48"]
    if mode == "lora":
        shape += ["--lora_rank=4", "--lora_alpha=4.0", "--lora_dropout=0.1", "--lora_targets=wq,wv,w2"]
    run_sft(d, tmp_path / "straight", "--max_iters=8", *common, *shape)
    run_sft(d, tmp_path / "stopped", "--max_iters=4", *common, *shape)
    run_sft(d, tmp_path / "stopped", "--max_iters=8", "--init_from=resume", *common)
    assert_same_run(tmp_path / "straight", "ckpt.pt", tmp_path / "stopped", "ckpt.pt", 1e-6,
                    key="lora" if mode == "lora" else "model")
    assert sorted(train_losses(tmp_path / "straight")) == list(range(8))
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


@pytest.mark.parametrize("always", [True, False])
def test_always_save_checkpoint(chat_files, tmp_path, always):
    """learning_rate 0: the held-out loss never improves after the first evaluation. always_save_checkpoint
    writes at every evaluation after the start; otherwise only the final state is written."""
    run_sft(chat_files, tmp_path, "--max_iters=4", "--eval_interval=2", "--learning_rate=0.0", "--min_lr=0.0",
            f"--always_save_checkpoint={always}")
    assert saved_at(tmp_path) == ([2, 4] if always else [4])


def test_gradient_is_the_same_however_the_batch_is_split(chat_files, tmp_path):
    assert_same_gradient_however_the_batch_is_split("sft.py", chat_files, tmp_path,
                                                    [f"--train_data={chat_files / 'train.jsonl'}"])


def test_fsdp_lora_on_two_processes_equals_one_process_with_tied_embeddings(chat_files, tmp_path):
    lora = [f"--train_data={chat_files / 'train.jsonl'}", "--lora_rank=4", "--pack=False"]
    finetune("sft.py", chat_files, tmp_path / "one", *lora)
    finetune("sft.py", chat_files, tmp_path / "fsdp", *lora, "--parallel=fsdp", launcher=TWO_PROCESSES)
    # only the adapters were trained and saved; merged.pt (gathered from the shards) is base + adapters
    assert all("lora_" in k for k in ck.load(str(tmp_path / "fsdp" / "ckpt.dcp"))["lora"])
    assert_same_run(tmp_path / "one", "merged.pt", tmp_path / "fsdp", "merged.pt", 1e-5)


# ---- faults ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_divergence_stops_and_keeps_the_good_checkpoint(chat_files, tmp_path):
    run_sft(chat_files, tmp_path, "--max_iters=6", "--eval_interval=2", "--learning_rate=3e-3")
    good = (tmp_path / "ckpt.pt").read_bytes()
    p = run_sft(chat_files, tmp_path, "--max_iters=20", "--eval_interval=2", "--learning_rate=1e30",
                "--warmup_iters=0", "--init_from=resume", check=False)
    assert p.returncode != 0 and "diverged" in p.stderr, p.stdout[-1000:] + p.stderr[-1500:]
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_empty_data_is_a_clear_error_not_a_hang(chat_files, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    t = time.time()
    p = run_script("sft.py", f"--init_ckpt={chat_files / 'base.pt'}", f"--train_data={tmp_path / 'empty.jsonl'}",
                   "--val_data=", f"--out_dir={tmp_path / 'run'}", "--device=cpu", check=False, timeout=120)
    assert p.returncode != 0 and "empty.jsonl" in p.stderr, p.stderr[-1500:]
    assert time.time() - t < 60
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_help_lists_the_globals_with_their_defaults_and_comments():
    p = run_script("sft.py", "--help")
    assert "--lora_alpha" in p.stdout and "= 16.0" in p.stdout and "0 = the checkpoint's context" in p.stdout


def test_a_moved_run_folder_is_evaluated_exported_and_served_from_another_directory(tmp_path):
    """The tokenizer travels with the checkpoint: the run folder moved, its tokenizer's recorded path gone, another
    working directory; a wrong --tokenizer_model is refused by sha256."""
    (tmp_path / "tok").mkdir(), (tmp_path / "chat").mkdir(), (tmp_path / "cwd").mkdir()
    tok = tiny_tokenizer(tmp_path / "tok")
    chat = write_chat_files(tmp_path / "chat", tok)
    finetune("sft.py", chat, tmp_path / "run", f"--train_data={chat / 'train.jsonl'}")
    assert (tmp_path / "run" / "tok.model").read_bytes() == open(tok.model_path, "rb").read()  # the copy beside
    shutil.move(tmp_path / "tok", tmp_path / "gone")  # the recorded path no longer exists
    shutil.move(tmp_path / "run", tmp_path / "elsewhere")
    ckpt = tmp_path / "elsewhere" / "ckpt.pt"
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")

    def script(name, *args):
        return subprocess.run([sys.executable, os.path.join(ROOT, name), f"--ckpt_path={ckpt}", *map(str, args)],
                              cwd=tmp_path / "cwd", env=ENV, capture_output=True, text=True, timeout=300)

    p = script("eval.py", "--mode=ppl", f"--val_data={tmp_path / 't.txt'}", "--device=cpu",
               f"--results_file={tmp_path / 'r.json'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["val_tokens"] == sum(len(tok.encode(t)) + 1 for t in TEXTS)
    p = script("export.py", f"--out_dir={tmp_path / 'hf'}")
    assert p.returncode == 0 and (tmp_path / "hf" / "tokenizer.model").read_bytes() == \
        (tmp_path / "gone" / "tok.model").read_bytes(), p.stderr[-2000:]
    proc, port = start_server(ckpt, "--device=cpu", cwd=tmp_path / "cwd")
    try:
        status, answer, _ = raw(port, "POST", "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        stop_server(proc)

    other = train_tokenizer(iter(TEXTS[::-1]), str(tmp_path / "other"), 390, num_threads=1, verbose=False)
    p = script("eval.py", f"--tokenizer_model={other}", "--max_new_tokens=2", "--device=cpu")
    assert p.returncode != 0 and "is not the tokenizer the model was trained with" in p.stderr
    assert other in p.stderr and str(ckpt) in p.stderr
