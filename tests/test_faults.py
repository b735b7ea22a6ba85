"""Fault injection on the training side: each common mistake or accident, reproduced, is refused by name or
survived without losing work. Diverged runs keep the good checkpoint; a fresh start over a run is refused;
empty data is an error, not a hang; wrong token files are refused with the file named; a run without
validation data still checkpoints; killed runs resume to the weights of a straight run; the objective does not
depend on how a batch is split; the small ones (stale temp files, duplicate log rows, typos in modes and types).
The data side is in test_faults_data.py, sampling boundaries and LoRA on a tied output in test_faults_model.py."""
import json
import math
import os
import signal
import subprocess
import sys
import time

from conftest import ENV, ROOT, TORCHRUN_2, run_script
import numpy as np
import pytest
from sft_fixtures import write_chat_files
import torch

from babyllama import checkpoint as ck, runlog, token_files
from babyllama.pairs import preference_loss

TINY = ["--dim=64", "--n_layers=2", "--n_heads=4", "--max_seq_len=32", "--batch_size=2", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--num_threads=1", "--dtype=float32",
        "--device=cpu", "--gradient_accumulation_steps=1"]


def write_bin(path, tokens, dtype=np.uint16, **meta):
    """A token file and the meta.json data_process.py would write beside it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.asarray(tokens, dtype=dtype).tofile(path)
    name = os.path.splitext(os.path.basename(path))[0]
    meta = {"dtype": "uint16", "vocab_size": 256, "tokenizer_sha256": "a" * 64, f"{name}_tokens": len(tokens),
            **meta}
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    old = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    with open(meta_path, "w") as f:
        json.dump({**old, **meta}, f)


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    d = tmp_path_factory.mktemp("bins")
    rng = np.random.default_rng(0)
    motifs = [rng.integers(4, 200, size=rng.integers(5, 20)) for _ in range(30)]
    stream = np.concatenate([motifs[i] for i in rng.integers(0, 30, size=2000)])
    write_bin(str(d / "train.bin"), stream)
    write_bin(str(d / "val.bin"), stream[:4000])
    return d


def pretrain(bins, out, *extra, check=True, **kw):
    return run_script("pretrain.py", *TINY, f"--train_data={bins / 'train.bin'}", f"--val_data={bins / 'val.bin'}",
                      f"--out_dir={out}", *extra, check=check, **kw)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ---- 1. divergence never replaces a good checkpoint ---------------------------------------------------------

def test_pretrain_divergence_stops_and_keeps_the_good_checkpoints(bins, tmp_path):
    pretrain(bins, tmp_path, "--max_iters=4", "--eval_interval=2")
    good, best = file_bytes(tmp_path / "ckpt.pt"), file_bytes(tmp_path / "best.pt")
    p = pretrain(bins, tmp_path, "--max_iters=50", "--eval_interval=1", "--init_from=resume",
                 "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0.0", check=False)
    assert p.returncode != 0 and "diverged" in p.stderr and "iteration" in p.stderr, p.stderr[-1500:]
    assert "(iteration 4)" in p.stderr
    assert file_bytes(tmp_path / "ckpt.pt") == good and file_bytes(tmp_path / "best.pt") == best


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_files(tmp_path_factory.mktemp("chat"))


def sft(chat, out, *extra, check=True):
    return run_script("sft.py", f"--init_ckpt={chat / 'base.pt'}", f"--train_data={chat / 'train.jsonl'}",
                      f"--out_dir={out}", "--num_threads=1", "--dtype=float32", "--device=cpu", "--log_interval=1",
                      *extra, check=check)


@pytest.mark.slow
def test_sft_divergence_stops_and_keeps_the_good_checkpoint(chat, tmp_path):
    sft(chat, tmp_path, f"--val_data={chat / 'train.jsonl'}", "--max_iters=6", "--eval_interval=2",
        "--batch_size=2", "--learning_rate=3e-3")
    good = file_bytes(tmp_path / "ckpt.pt")
    p = sft(chat, tmp_path, f"--val_data={chat / 'train.jsonl'}", "--max_iters=20", "--eval_interval=2",
            "--batch_size=2", "--learning_rate=1e30", "--warmup_iters=0", "--init_from=resume", check=False)
    assert p.returncode != 0 and "diverged" in p.stderr, p.stdout[-1000:] + p.stderr[-1500:]
    assert file_bytes(tmp_path / "ckpt.pt") == good


# ---- 2. a fresh start over an existing run -----------------------------------------------------------------

def test_resume_step_refuses_a_new_run_over_a_checkpoint_unless_told(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ck.save(path, {"iter_num": 7})
    ck.save(str(tmp_path / "best.pt"), {"iter_num": 5})
    with pytest.raises(SystemExit, match=r"a run of 7 iterations.*--init_from=resume.*--overwrite=True"):
        ck.resume("scratch", "scratch", path, "cpu", {}, [], (), overwrite=False)
    assert ck.resume("scratch", "scratch", path, "cpu", {}, [], (), overwrite=True) == (None, {})
    # (the Checkpointer of the new run then removes ckpt.pt and best.pt: test_checkpoint.py)


@pytest.mark.slow
def test_fresh_start_over_an_existing_run_is_refused(bins, tmp_path):
    pretrain(bins, tmp_path, "--max_iters=2", "--eval_interval=100")
    before, log = file_bytes(tmp_path / "ckpt.pt"), file_bytes(tmp_path / "log.jsonl")
    p = pretrain(bins, tmp_path, "--max_iters=2", "--eval_interval=100", check=False)
    assert p.returncode != 0 and "--init_from=resume" in p.stderr and "--overwrite=True" in p.stderr
    assert file_bytes(tmp_path / "ckpt.pt") == before and file_bytes(tmp_path / "log.jsonl") == log
    pretrain(bins, tmp_path, "--max_iters=1", "--eval_interval=100", "--overwrite=True")  # told: it starts over
    assert ck.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 1


# ---- 3. empty data ------------------------------------------------------------------------------------------

def test_empty_sft_data_is_a_clear_error_not_a_hang(chat, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    t = time.time()
    p = run_script("sft.py", f"--init_ckpt={chat / 'base.pt'}", f"--train_data={tmp_path / 'empty.jsonl'}",
                   "--val_data=", f"--out_dir={tmp_path / 'run'}", "--device=cpu", check=False, timeout=120)
    assert p.returncode != 0 and "empty.jsonl" in p.stderr, p.stderr[-1500:]
    assert time.time() - t < 60
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


# ---- 5. wrong token files, refused by name ------------------------------------------------------------------

def test_wrong_token_files_are_refused_with_the_file_named(tmp_path):
    good = str(tmp_path / "good" / "train.bin")
    write_bin(good, np.arange(100) % 200)
    assert len(token_files.open_bins(good)[0][0]) == 100
    cases = {
        "int32": lambda p: write_bin(p, np.arange(100) % 200, dtype=np.int32, train_tokens=100),
        "odd": lambda p: (write_bin(p, np.arange(100) % 200), open(p, "ab").write(b"\0")),
        "out_of_range": lambda p: write_bin(p, [1, 2, 300, 4]),
        "empty": lambda p: write_bin(p, []),
    }
    for name, make in cases.items():
        path = str(tmp_path / name / "train.bin")
        make(path)
        with pytest.raises(ValueError, match=os.path.basename(os.path.dirname(path))):
            token_files.open_bins(path)
    other = str(tmp_path / "other" / "train.bin")  # another tokenizer's tokens, of the same vocabulary size
    write_bin(other, np.arange(100) % 200, tokenizer_sha256="b" * 64)
    with pytest.raises(ValueError, match="other.*tokenizer"):
        token_files.open_bins(f"{good},{other}")
    os.remove(os.path.join(os.path.dirname(other), "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        token_files.open_bins(other)


# ---- 6. resume may not change what the checkpoint fixes ------------------------------------------------------

def test_resume_refuses_lora_on_a_full_checkpoint():
    ckpt = {"config": {"lora_rank": 0, "max_seq_len": 64}}
    with pytest.raises(SystemExit, match=r"lora_rank=8 \(checkpoint: 0\)"):
        ck.resume_config(ckpt, {"lora_rank": 8, "max_seq_len": 64}, ["lora_rank"], ck.FINETUNE_KEYS)
    with pytest.raises(SystemExit, match=r"max_seq_len=128 \(checkpoint: 64\)"):
        ck.resume_config(ckpt, {"lora_rank": 0, "max_seq_len": 128}, ["max_seq_len"], ck.FINETUNE_KEYS)


# ---- 8. no validation data: checkpoints on the interval all the same ------------------------------------------

def test_training_without_validation_data_checkpoints_every_eval_interval(bins, tmp_path):
    run_script("pretrain.py", *TINY, f"--train_data={bins / 'train.bin'}", "--val_data=", f"--out_dir={tmp_path}",
               "--max_iters=5", "--eval_interval=2")
    saves = [r["iter"] for r in runlog.read_jsonl(str(tmp_path / "log.jsonl")) if "checkpoint" in r]
    assert saves == [2, 4, 5]


# ---- 9. the small ones -------------------------------------------------------------------------------------

def test_temp_files_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open(f"{path}.tmp.{dead.pid}", "wb").write(b"half")
    open(f"{path}.tmp.{os.getpid()}x", "wb").write(b"not ours")  # not a pid: left alone
    ck.save(path, {"iter_num": 1})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", f"ckpt.pt.tmp.{os.getpid()}x"]


def test_resumed_log_keeps_no_row_twice(tmp_path):
    path = str(tmp_path / "log.jsonl")
    log = runlog.JsonlLog(path)
    for it in range(7):  # a run killed at iteration 6 whose last checkpoint is iteration 4
        if it % 2 == 0:
            log.write(iter=it, val_loss=5.0 - it)
            log.write(iter=it, checkpoint="ckpt.pt")
        log.write(iter=it, loss=6.0 - it)
    log.close()
    with open(path, "a") as f:
        f.write('{"iter": 7, "lo')  # the kill cut the last line short
    log = runlog.JsonlLog(path, resume_from=4)
    for it in range(4, 6):
        log.write(iter=it, loss=1.0)
    log.close()
    rows = runlog.read_jsonl(path)
    train = [r["iter"] for r in rows if "loss" in r]
    assert train == [0, 1, 2, 3, 4, 5]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]


def test_eval_refuses_unknown_modes_token_files_that_are_not_and_another_tokenizer(chat, tmp_path):
    base = str(chat / "base.pt")
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=samples", check=False)
    assert p.returncode != 0 and "mode must be one of" in p.stderr and "'samples'" in p.stderr
    p = run_script("eval.py", f"--ckpt_path={base}", "--mode=loss", f"--val_data={chat / 'train.jsonl'}",
                   check=False)
    # conversations are not text documents: the file and its first skipped line are named, and what ppl reads
    assert p.returncode != 0 and "train.jsonl:1: no text field" in p.stderr and ".bin" in p.stderr
    from sft_fixtures import TEXTS

    from tokenizer.train_tokenizer import train_tokenizer
    other = train_tokenizer(iter([t[::-1] for t in TEXTS]), str(tmp_path / "other"), 400, num_threads=1,
                            verbose=False)  # the same characters and size, other merges: another tokenizer
    p = run_script("eval.py", f"--ckpt_path={base}", f"--tokenizer_model={other}", "--max_new_tokens=4",
                   check=False)
    assert p.returncode != 0 and "sha256" in p.stderr


def test_chat_batch_skips_records_without_a_question_and_answers_the_rest(chat, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "你好"}\n{"prompt": "no question key"}\n{"question": "《静夜思》的作者是谁？"}\n',
                 encoding="utf-8")
    p = run_script("eval.py", "--mode=chat", f"--ckpt_path={chat / 'base.pt'}", f"--questions_file={q}",
                   f"--answers_file={tmp_path / 'a.jsonl'}", "--max_new_tokens=4", "--temperature=0.0")
    answers = runlog.read_jsonl(str(tmp_path / "a.jsonl"))
    assert [a["question"] for a in answers] == ["你好", "《静夜思》的作者是谁？"]
    assert "q.jsonl:2" in p.stdout and "no question" in p.stdout


def test_configurator_refuses_none_and_bad_dtype_and_help_lists_the_globals(bins, tmp_path):
    p = run_script("pretrain.py", "--batch_size=None", check=False)
    assert p.returncode != 0 and "--batch_size=None" in p.stderr and "Traceback" not in p.stderr
    p = pretrain(bins, tmp_path, "--dtype=fp16", check=False)
    assert p.returncode != 0 and "dtype must be one of" in p.stderr and "'fp16'" in p.stderr
    p = run_script("sft.py", "--help")
    assert "--lora_alpha" in p.stdout and "= 16.0" in p.stdout and "0 = the checkpoint's context" in p.stdout


# ---- 10. ORPO near a reply of probability 1 ------------------------------------------------------------------

def test_orpo_is_finite_with_finite_gradients_when_a_reply_is_certain():
    for avg in (-1e-8, 0.0):
        logp = torch.tensor([avg * 4, -6.0], requires_grad=True)  # chosen: 4 tokens, mean log-prob avg
        loss, _, _ = preference_loss("orpo", logp[:1], logp[1:], None, None, torch.tensor([4]), torch.tensor([3]),
                                     beta=0.1)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all(), (avg, loss, logp.grad)
    # end to end through a training step: a policy that already puts all its mass on the chosen reply
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=0.1)
    for _ in range(2):
        pol_c = torch.log_softmax(torch.stack([w[0] + 1e4, w[1]]), 0)[:1] * 3  # log p(chosen) = 0 in fp32
        pol_r = torch.log_softmax(torch.stack([w[0], w[1] + 1.0]), 0)[:1] * 3
        loss, _, _ = preference_loss("orpo", pol_c, pol_r, None, None, torch.tensor([3]), torch.tensor([3]), 0.1)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(w.grad).all()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(w).all()


# ---- 11. the objective does not depend on how a batch is split ----------------------------------------------

def first_gradient(out_dir):
    """AdamW's first moment after one step is (1 - beta1) x the gradient: the checkpoint holds the gradient."""
    state = ck.load(str(out_dir / "ckpt.pt"))["optimizer"]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)]) / (1 - 0.9)


SPLITS = {"4x1": ["--batch_size=4", "--gradient_accumulation_steps=1"],
          "1x4": ["--batch_size=1", "--gradient_accumulation_steps=4"]}


def assert_same_gradients(grads):
    ref = grads.pop("4x1")
    for name, g in grads.items():
        err = (g - ref).abs().max().item() / ref.abs().max().item()
        assert err <= 1e-5, (name, err)


def split_runs(script, chat, tmp_path, extra):
    """The first gradient of one iteration of 4 samples, as batch 4 x 1 micro-step, 1 x 4, and 2 processes x
    1 x 2."""
    grads = {}
    runs = dict(SPLITS, **{"2x1x2": ["--batch_size=1", "--gradient_accumulation_steps=4"]})
    for name, split in runs.items():
        out = tmp_path / name
        run_script(script, f"--init_ckpt={chat / 'base.pt'}", f"--out_dir={out}", "--val_data=", "--max_iters=1",
                   "--num_threads=1", "--dtype=float32", "--device=cpu", "--grad_clip=0.0", "--warmup_iters=0",
                   "--n_samples=0" if script == "dpo.py" else "--pack=False", *extra, *split,
                   launcher=TORCHRUN_2 if name == "2x1x2" else None)
        grads[name] = first_gradient(out)
    return grads


def test_sft_gradient_is_the_same_however_the_batch_is_split(chat, tmp_path):
    assert_same_gradients(split_runs("sft.py", chat, tmp_path, [f"--train_data={chat / 'train.jsonl'}"]))


def test_dpo_gradient_is_the_same_however_the_batch_is_split(chat, tmp_path):
    extra = [f"--train_data={chat / 'pairs.jsonl'}", "--sft_weight=0.5", "--learning_rate=1e-3"]
    assert_same_gradients(split_runs("dpo.py", chat, tmp_path, extra))


# ---- kill -9, at an iteration and in the middle of a save -------------------------------------------------------

def weights(out):
    return ck.load(str(out / "ckpt.pt"))["model"]


@pytest.mark.slow
def test_killed_runs_resume_to_the_weights_of_a_straight_run(bins, tmp_path):
    sched = ["--max_iters=60", "--eval_interval=4", "--lr_decay_iters=60", "--dropout=0.1"]
    pretrain(bins, tmp_path / "straight", *sched)
    # killed in the middle of its third save (iteration 12): ckpt.pt still holds iteration 8, whole
    env = dict(ENV, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "faults"), ROOT]), KILL_AT_SAVE="3")
    out = tmp_path / "killed_in_save"
    cmd = [sys.executable, "pretrain.py", *TINY, f"--train_data={bins / 'train.bin'}",
           f"--val_data={bins / 'val.bin'}", f"--out_dir={out}", *sched]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert ck.load(str(out / "ckpt.pt"))["iter_num"] == 8 and any(".tmp." in f for f in os.listdir(out))
    # killed at an iteration between saves, by the test, once the log shows iteration 14 (the run goes on a few
    # iterations more before the signal lands, but not to the end)
    out2 = tmp_path / "killed_between"
    proc = subprocess.Popen([*cmd[:-len(sched) - 1], f"--out_dir={out2}", *sched], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(r.get("iter", 0) >= 14 and "loss" in r for r in
                                             (runlog.read_jsonl(str(out2 / "log.jsonl")) if (out2 / "log.jsonl").exists()
                                              else [])):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert 12 <= ck.load(str(out2 / "ckpt.pt"))["iter_num"] < 60
    straight = weights(tmp_path / "straight")
    for killed in (out, out2):
        pretrain(bins, killed, *sched, "--init_from=resume")
        assert not any(".tmp." in f for f in os.listdir(killed))  # the dead writer's temp file is gone
        rows = [r["iter"] for r in runlog.read_jsonl(str(killed / "log.jsonl")) if "loss" in r]
        assert rows == list(range(60))  # every iteration once
        for k, v in weights(killed).items():
            assert torch.allclose(v, straight[k], atol=1e-6, rtol=0), (killed.name, k)
