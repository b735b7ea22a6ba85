"""babyllama/checkpoint.py one piece at a time: the adapter-or-full training state, what a resumed run takes from
its checkpoint and refuses to change (a new run over an old one included), when a loop evaluates and saves (the
tokenizer copied beside at the first save), and the losses that stop a run. The file itself: test_checkpoint_io.py."""
import hashlib
import os

from conftest import SMALL_ARGS, tiny_model
import pytest
import torch

from babyllama import checkpoint as ck, checkpoint_io, dist, runlog
from babyllama.lora import apply_lora, lora_state_dict
from babyllama.rng import rng_state


def test_training_state_holds_adapters_only_for_lora():
    model = tiny_model(**SMALL_ARGS)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    full = ck.training_state(model, opt, scaler, [rng_state()], iter_num=3, init_ckpt="base.pt")
    assert "model" in full and "lora" not in full and full["iter_num"] == 3
    apply_lora(model, rank=2, alpha=4.0, targets="wq,wv")
    lora = ck.training_state(model, opt, scaler, [rng_state()], iter_num=3, init_ckpt="base.pt")
    assert "model" not in lora and lora["base_ckpt"] == "base.pt"
    assert set(lora["lora"]) == set(lora_state_dict(model)) and all("lora_" in k for k in lora["lora"])
    assert lora["lora_config"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wv"]}


def test_resume_config_takes_locked_keys_from_the_checkpoint_and_refuses_changes():
    ckpt = {"config": {"lora_rank": 4, "lora_alpha": 4.0, "lora_targets": "wq,wv", "max_seq_len": 48,
                       "learning_rate": 1e-3}}
    now = {"lora_rank": 0, "lora_alpha": 16.0, "lora_targets": "wq,wk,wv,wo,w1,w2,w3", "max_seq_len": 0,
           "learning_rate": 5e-4}
    keys = ("lora_rank", "lora_alpha", "lora_targets", "max_seq_len")
    got = ck.resume_config(ckpt, now, changed=["learning_rate"], keys=keys)
    assert got == {k: ckpt["config"][k] for k in keys}  # the adapters and context are fixed, not the schedule
    same = ck.resume_config(ckpt, dict(now, lora_alpha=4.0), changed=["lora_alpha"], keys=keys)
    assert same["lora_alpha"] == 4.0  # repeating the checkpoint's value is fine
    with pytest.raises(SystemExit, match=r"lora_alpha=32.0 \(checkpoint: 4.0\)"):
        ck.resume_config(ckpt, dict(now, lora_alpha=32.0), changed=["lora_alpha"], keys=keys)
    with pytest.raises(SystemExit, match="init_from must be 'scratch' or 'resume'"):
        ck.resume("pretrain", "scratch", "x.pt", "cpu", {}, [], keys)
    assert ck.resume("scratch", "scratch", "x.pt", "cpu", {}, [], keys) == (None, {})


def test_resume_step_refuses_a_new_run_over_a_checkpoint_unless_told(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint_io.save(path, {"iter_num": 7})
    checkpoint_io.save(str(tmp_path / "best.pt"), {"iter_num": 5})
    with pytest.raises(SystemExit, match=r"a run of 7 iterations.*--init_from=resume.*--overwrite=True"):
        ck.resume("scratch", "scratch", path, "cpu", {}, [], (), overwrite=False)
    assert ck.resume("scratch", "scratch", path, "cpu", {}, [], (), overwrite=True) == (None, {})
    # (the Checkpointer of the new run then removes ckpt.pt and best.pt: below)


def test_resume_refuses_lora_on_a_full_checkpoint():
    ckpt = {"config": {"lora_rank": 0, "max_seq_len": 64}}
    with pytest.raises(SystemExit, match=r"lora_rank=8 \(checkpoint: 0\)"):
        ck.resume_config(ckpt, {"lora_rank": 8, "max_seq_len": 64}, ["lora_rank"], ck.FINETUNE_KEYS)
    with pytest.raises(SystemExit, match=r"max_seq_len=128 \(checkpoint: 64\)"):
        ck.resume_config(ckpt, {"lora_rank": 0, "max_seq_len": 128}, ["max_seq_len"], ck.FINETUNE_KEYS)


def checkpointer(tmp_path, ckpt=None, always=True, **fields):
    model = tiny_model(**SMALL_ARGS)
    run = dist.setup_run("cpu", "float32", 0, 1, str(tmp_path))
    log = runlog.JsonlLog(str(tmp_path / "log.jsonl"), resume_from=ckpt["iter_num"] if ckpt else None)
    optimizer = ck.training_optimizer(model, None, run, 0, 0.0, 1e-3, (0.9, 0.95))
    return ck.Checkpointer(str(tmp_path / "ckpt.pt"), ckpt, run, model, optimizer, log, 2, always,
                           model_args=SMALL_ARGS, config={}, **fields)


def loop(c, iters, losses):
    """The skeleton of every script's loop: evaluate when due, save the end."""
    evaluated = []
    for it in iters:
        last = it == iters[-1]
        if c.eval_due(it, last):
            evaluated.append(it)
            c.after_eval(it, losses[it])
        if last:
            break
    c.at_end(iters[-1])
    c.log.close()
    return evaluated, [r["iter"] for r in runlog.read_jsonl(c.log.path) if "checkpoint" in r]


def test_checkpointer_evaluates_and_saves_the_same_way_for_every_script(tmp_path):
    losses = {0: 5.0, 2: 4.0, 4: 4.5, 6: 4.2, 8: 3.0}
    assert loop(checkpointer(tmp_path / "a"), range(9), losses) == ([0, 2, 4, 6, 8], [2, 4, 6, 8])
    # the last iteration right after an evaluation is not evaluated again, but saved
    assert loop(checkpointer(tmp_path / "a7"), range(8), losses) == ([0, 2, 4, 6], [2, 4, 6, 7])
    # without always_save_checkpoint: improvements only (2: 4.0 < 5.0; 4 and 6 are worse than 4.0), then the end
    losses[9] = 3.0
    assert loop(checkpointer(tmp_path / "b", always=False), range(10), losses) == ([0, 2, 4, 6, 8], [2, 8, 9])
    losses[8] = 9.0  # the end is saved even when it is no improvement
    assert loop(checkpointer(tmp_path / "c", always=False), range(9), losses) == ([0, 2, 4, 6, 8], [2, 8])
    saved = checkpoint_io.load(str(tmp_path / "c" / "ckpt.pt"))
    assert saved["iter_num"] == 8 and saved["best_val_loss"] == 4.0 and saved["model_args"] == SMALL_ARGS
    # resumed at 4 with best 4.0: no evaluation or save at 4 itself
    resumed = checkpointer(tmp_path / "d", {"iter_num": 4, "best_val_loss": 4.0}, always=False)
    assert loop(resumed, range(4, 9), {6: 4.2, 8: 3.5}) == ([6, 8], [8])
    assert resumed.best_val_loss == 3.5


def test_the_first_save_copies_the_recorded_tokenizer_beside_the_checkpoint(tmp_path, capsys):
    (tmp_path / "tok.model").write_bytes(b"a tokenizer")
    sha = hashlib.sha256(b"a tokenizer").hexdigest()
    c = checkpointer(tmp_path / "run", tokenizer=str(tmp_path / "tok.model"), tokenizer_sha256=sha)
    assert not (tmp_path / "run" / "tok.model").exists()  # nothing at the start
    loop(c, range(3), {0: 5.0, 2: 4.0})
    assert (tmp_path / "run" / "tok.model").read_bytes() == b"a tokenizer"
    assert checkpoint_io.load(str(tmp_path / "run" / "ckpt.pt"))["tokenizer"] == str(tmp_path / "tok.model")
    # a tokenizer that is not there (or not the recorded one): saved all the same, saying so
    loop(checkpointer(tmp_path / "gone", tokenizer="nope.model", tokenizer_sha256=sha), range(3), {0: 5.0, 2: 4.0})
    assert (tmp_path / "gone" / "ckpt.pt").exists() and "nope.model not found" in capsys.readouterr().out


def test_nan_validation_loss_stops_before_saving(tmp_path):
    c = checkpointer(tmp_path)
    c.after_eval(2, 4.0)
    with pytest.raises(FloatingPointError, match=r"iteration 4.*diverged.*\(iteration 2\)"):
        c.after_eval(4, float("nan"))
    assert checkpoint_io.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 2


def test_losses_back_at_a_uniform_guess_stop_the_run_and_preference_losses_only_on_nan(tmp_path):
    c = checkpointer(tmp_path)
    c.ceiling = 4.0  # ln V
    c.check_train_loss(0, 4.2)  # a new model starts at the ceiling: fine
    c.check_train_loss(1, 2.0)
    c.check_train_loss(2, 3.9)  # a hard batch: fine
    with pytest.raises(FloatingPointError, match="training loss 4.1 at iteration 3 is back at 4.000"):
        c.check_train_loss(3, 4.1)
    c.after_eval(2, 1.0)
    with pytest.raises(FloatingPointError, match="reached 4.000"):
        c.after_eval(4, 4.0)
    c.ceiling = None  # a preference loss: 0.04 -> 0.13 is noise or overfitting, not divergence
    c.after_eval(4, 0.04)
    c.after_eval(6, 0.13)
    with pytest.raises(FloatingPointError, match="not a number"):
        c.after_eval(8, float("inf"))
    assert checkpoint_io.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 6


def test_a_new_run_removes_the_old_runs_checkpoints_before_writing(tmp_path):
    checkpoint_io.save(str(tmp_path / "ckpt.pt"), {"iter_num": 9})
    checkpoint_io.save(str(tmp_path / "best.pt"), {"iter_num": 7})
    checkpointer(tmp_path)  # a new run (the script's resume step let it through: --overwrite=True)
    assert not os.path.exists(tmp_path / "ckpt.pt") and not os.path.exists(tmp_path / "best.pt")


def test_a_time_boxed_stop_right_after_an_evaluation_does_not_evaluate_again(tmp_path):
    run = dist.setup_run("cpu", "float32", 0, 1, str(tmp_path))
    c = ck.Checkpointer(str(tmp_path / "ckpt.pt"), None, run, None, None, None, 200, True)
    c.evaluated_at = 400  # what after_eval records
    assert c.eval_due(400, False) and c.eval_due(600, False)
    assert not c.eval_due(401, last=True)  # stopped by max_minutes one step after the evaluation at 400
    assert c.eval_due(402, last=True)  # training since: evaluate the end
