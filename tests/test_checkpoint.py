"""checkpoint.py and the loop helpers of train_utils, one by one: atomic writes, the adapter-or-full choice,
models back from any checkpoint (a LoRA one whose folder moved included), what a resumed run takes from its
checkpoint and refuses to change, when a loop evaluates and saves, and training time without evaluation time."""
import os
import shutil

import pytest
import torch

from babyllama import checkpoint as ck, dist, models, runlog
from babyllama.atomic import atomic_path
from babyllama.lora import apply_lora, lora_state_dict
from babyllama.rng import rng_state
from model import ModelArgs, Transformer

ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**ARGS))


def test_save_is_atomic_and_load_names_a_missing_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ck.save(path, {"iter_num": 1})

    with pytest.raises(KeyboardInterrupt):  # a save that dies half-way
        with atomic_path(path) as tmp:
            open(tmp, "wb").write(b"half a checkpoint")
            raise KeyboardInterrupt
    assert ck.load(path)["iter_num"] == 1  # the good checkpoint is untouched
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temp file is left behind
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.load(str(tmp_path / "nope.pt"))


def test_training_state_holds_adapters_only_for_lora():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    full = ck.training_state(model, opt, scaler, [rng_state()], iter_num=3, init_ckpt="base.pt")
    assert "model" in full and "lora" not in full and full["iter_num"] == 3
    apply_lora(model, rank=2, alpha=4.0, targets="wq,wv")
    lora = ck.training_state(model, opt, scaler, [rng_state()], iter_num=3, init_ckpt="base.pt")
    assert "model" not in lora and lora["base_ckpt"] == "base.pt"
    assert set(lora["lora"]) == set(lora_state_dict(model)) and all("lora_" in k for k in lora["lora"])
    assert lora["lora_config"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wv"]}


def test_load_model_merges_a_lora_checkpoint_whose_folder_moved(tmp_path):
    base = tiny()
    ck.save(str(tmp_path / "run" / "base.pt"), {"model": base.state_dict(), "model_args": ARGS})
    adapted = apply_lora(tiny(), rank=2, alpha=4.0, targets="wq,w2")
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter changes the outputs
    ck.save(str(tmp_path / "run" / "ckpt.pt"), {"lora": lora_state_dict(adapted), "model_args": ARGS,
                                                "lora_config": adapted.lora_config,
                                                "base_ckpt": str(tmp_path / "run" / "base.pt")})
    shutil.move(tmp_path / "run", tmp_path / "moved")  # base_ckpt now names a path that is gone
    model, ckpt = models.load_model(str(tmp_path / "moved" / "ckpt.pt"))
    assert not any("lora_" in k for k in model.state_dict())  # merged: a plain Transformer
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(x)[0], adapted(x)[0], atol=1e-5)
        assert not torch.allclose(model(x)[0], base(x)[0], atol=1e-3)


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


def test_finetune_model_resumes_the_adapters_on_the_starting_weights(tmp_path):
    ck.save(str(tmp_path / "base.pt"), {"model": tiny().state_dict(), "model_args": ARGS})
    model, args, start, _ = models.finetune_model(str(tmp_path / "base.pt"), None, "cpu", seed=1, max_seq_len=12,
                                              lora_rank=2, lora_alpha=4.0, lora_targets="wq")
    assert args["max_seq_len"] == 12 and model.lora_config["alpha"] == 4.0
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p)
    saved = {"lora": lora_state_dict(model)}
    again, _, _, _ = models.finetune_model(str(tmp_path / "base.pt"), saved, "cpu", seed=2, max_seq_len=12,
                                       lora_rank=2, lora_alpha=4.0, lora_targets="wq")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert set(start) == set(tiny().state_dict())  # the starting weights, plain names (the DPO reference)


def checkpointer(tmp_path, ckpt=None, always=True):
    model = tiny()
    run = dist.setup_run("cpu", "float32", 0, 1, str(tmp_path))
    log = runlog.JsonlLog(str(tmp_path / "log.jsonl"), resume_from=ckpt["iter_num"] if ckpt else None)
    optimizer = ck.training_optimizer(model, None, run, 0, 0.0, 1e-3, (0.9, 0.95))
    return ck.Checkpointer(str(tmp_path / "ckpt.pt"), ckpt, run, model, optimizer, log, 2, always,
                           model_args=ARGS, config={})


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
    saved = ck.load(str(tmp_path / "c" / "ckpt.pt"))
    assert saved["iter_num"] == 8 and saved["best_val_loss"] == 4.0 and saved["model_args"] == ARGS
    # resumed at 4 with best 4.0: no evaluation or save at 4 itself
    resumed = checkpointer(tmp_path / "d", {"iter_num": 4, "best_val_loss": 4.0}, always=False)
    assert loop(resumed, range(4, 9), {6: 4.2, 8: 3.5}) == ([6, 8], [8])
    assert resumed.best_val_loss == 3.5


def test_nan_validation_loss_stops_before_saving(tmp_path):
    c = checkpointer(tmp_path)
    c.after_eval(2, 4.0)
    with pytest.raises(FloatingPointError, match=r"iteration 4.*diverged.*\(iteration 2\)"):
        c.after_eval(4, float("nan"))
    assert ck.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 2


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
    assert ck.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 6


def test_a_new_run_removes_the_old_runs_checkpoints_before_writing(tmp_path):
    ck.save(str(tmp_path / "ckpt.pt"), {"iter_num": 9})
    ck.save(str(tmp_path / "best.pt"), {"iter_num": 7})
    checkpointer(tmp_path)  # a new run (the script's resume step let it through: --overwrite=True)
    assert not os.path.exists(tmp_path / "ckpt.pt") and not os.path.exists(tmp_path / "best.pt")
