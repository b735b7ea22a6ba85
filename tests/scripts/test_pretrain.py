"""pretrain.py as users run it (subprocesses; two processes under torchrun, or in its environment through
tests/two_processes.py): DDP and FSDP give the run of one process, a resumed run continues exactly (taking its
architecture and context from the checkpoint), runs killed at an iteration or in the middle of a save resume to the
weights of a straight run, a diverged run stops keeping the good checkpoints, a fresh start over a run is refused, a
run without validation data checkpoints all the same, bad settings are refused by name (a LoRA checkpoint to start
from too), the demo recipe trains the same model with one or two threads, and a uint32 corpus (a vocabulary over
65,535) is trained, resumed and evaluated."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from babyllama import checkpoint as ck, checkpoint_io, models, precision, runlog, sharded
from babyllama.lora import apply_lora
from babyllama.rng import rng_state
from babyllama.split import is_val
from conftest import (ENV, ROOT, TINY_PRETRAIN, TORCHRUN_2, TWO_PROCESSES, assert_same_run, pretrain, run_script,
                      saved_at, tiny_model, train_losses, write_motif_bins)
from tokenizer import Tokenizer
from tokenizer_files import train_wide_byte_level

ONE_STEP = "--gradient_accumulation_steps=1"  # one micro-step per iteration: the fault tests' runs are quicker


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_double_accumulation(motif_bins, tmp_path):
    steps = ["--max_iters=4", "--eval_interval=100", "--gradient_accumulation_steps=4"]
    pretrain(motif_bins, tmp_path / "single", *steps)
    pretrain(motif_bins, tmp_path / "ddp", *steps, launcher=TORCHRUN_2)
    assert sorted(train_losses(tmp_path / "single")) == [0, 1, 2, 3]
    assert_same_run(tmp_path / "single", "ckpt.pt", tmp_path / "ddp", "ckpt.pt", 1e-5)


def test_fsdp_equals_one_process_and_resumes_from_two_processes_on_one_and_back(motif_bins, tmp_path):
    # untied embeddings, 6 iterations of 4 micro-steps: one process with the plain model, against FSDP on 2
    # processes (0-2), then resumed on 1 (2-4), then on 2 again (4-6)
    untied = ["--tie_embeddings=False", "--lr_decay_iters=6", "--eval_interval=2"]
    pretrain(motif_bins, tmp_path / "straight", *untied, "--max_iters=6")
    for n_iters, launcher in ((2, TWO_PROCESSES), (4, None), (6, TWO_PROCESSES)):
        resume = ["--init_from=resume"] if n_iters > 2 else []
        pretrain(motif_bins, tmp_path / "fsdp", *untied, f"--max_iters={n_iters}", "--parallel=fsdp", *resume,
                 launcher=launcher)
        assert os.path.islink(tmp_path / "fsdp" / "ckpt.dcp")
    assert_same_run(tmp_path / "straight", "ckpt.pt", tmp_path / "fsdp", "ckpt.dcp", 1e-5)
    # only the folders the links name are kept; the converter (python checkpoint.py X.dcp Y.pt: these two
    # calls) writes what eval.py and export read
    assert sorted(os.listdir(tmp_path / "fsdp" / "dcp")) == ["iter_00000006"]
    ck.save(str(tmp_path / "model.pt"), sharded.consolidate(str(tmp_path / "fsdp" / "ckpt.dcp")))
    one = torch.load(tmp_path / "model.pt", weights_only=True)
    assert one["iter_num"] == 6 and one["model_args"]["tie_embeddings"] is False
    model, _ = models.load_model(str(tmp_path / "model.pt"))
    straight = ck.load(str(tmp_path / "straight" / "ckpt.pt"))["model"]
    for k, v in model.state_dict().items():
        assert torch.allclose(v, straight[k], atol=1e-5, rtol=0), k


def test_checkpoint_loads_with_weights_only_and_records_the_config_used(motif_bins, tmp_path):
    pretrain(motif_bins, tmp_path, "--max_iters=2", "--eval_interval=100", plots=True)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("model", "optimizer", "model_args", "iter_num", "config", "rng", "data"):
        assert key in ckpt, key
    assert ckpt["iter_num"] == 2 and ckpt["config"]["dim"] == 64
    # derived settings as the run used them, not the 0 meaning "fill in" (lr_decay_iters 0 = max_iters,
    # vocab_size 0 = the token files' meta.json)
    assert ckpt["config"]["lr_decay_iters"] == 2 and ckpt["config"]["vocab_size"] == 256
    assert os.path.exists(tmp_path / "loss.png")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temp file left behind


def test_resume_takes_the_checkpoints_architecture_and_context(motif_bins, tmp_path):
    """Resumed without the shape flags (the defaults say dim 288, max_seq_len 256), the run continues the
    checkpoint's 64-dim model and draws batches of its max_seq_len 32; asking for another shape is refused."""
    shape = [a for a in TINY_PRETRAIN if not a.startswith(("--dim", "--max_seq_len"))]
    args = [f"--train_data={motif_bins / 'train.bin'}", f"--val_data={motif_bins / 'val.bin'}",
            f"--out_dir={tmp_path}", "--eval_interval=100"]
    pretrain(motif_bins, tmp_path, "--eval_interval=100", "--max_iters=2")
    p = run_script("pretrain.py", *shape, *args, "--max_iters=3", "--init_from=resume")
    # batches of 256 tokens would not even fit the 32-position model; the run says what it draws
    assert "x 2 x 32)" in p.stdout, p.stdout[:500]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3 and ckpt["model_args"]["max_seq_len"] == 32
    assert ckpt["config"]["max_seq_len"] == 32 and ckpt["config"]["dim"] == 64
    p = run_script("pretrain.py", *shape, *args, "--max_iters=4", "--init_from=resume", "--dim=128", check=False)
    assert p.returncode != 0 and "dim=128" in p.stderr and "checkpoint: 64" in p.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 3  # nothing written


# ---- faults: each common mistake or accident refused by name, or survived without losing work -------------------

# an absurd learning rate makes the weights overflow after the first update
DIVERGE = ["--max_iters=50", "--eval_interval=1", "--init_from=resume", "--learning_rate=1e30", "--warmup_iters=0",
           "--grad_clip=0.0"]


@pytest.mark.slow  # test_divergence_stops_and_keeps_the_good_checkpoints checks the same, byte for byte
def test_nan_loss_stops_with_iteration_and_keeps_last_good_checkpoint(motif_bins, tmp_path):
    pretrain(motif_bins, tmp_path, "--max_iters=3", "--eval_interval=1")
    p = pretrain(motif_bins, tmp_path, *DIVERGE, check=False)
    assert p.returncode != 0
    assert "iteration" in p.stderr and ("nan" in p.stderr or "inf" in p.stderr), p.stderr[-2000:]
    for k, v in ck.load(str(tmp_path / "ckpt.pt"))["model"].items():
        assert torch.isfinite(v).all(), k


def test_divergence_stops_and_keeps_the_good_checkpoints(motif_bins, tmp_path):
    pretrain(motif_bins, tmp_path, ONE_STEP, "--max_iters=4", "--eval_interval=2")
    good, best = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "best.pt").read_bytes()
    p = pretrain(motif_bins, tmp_path, ONE_STEP, *DIVERGE, check=False)
    assert p.returncode != 0 and "diverged" in p.stderr and "iteration" in p.stderr, p.stderr[-1500:]
    assert "(iteration 4)" in p.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == good and (tmp_path / "best.pt").read_bytes() == best


@pytest.mark.slow
def test_fresh_start_over_an_existing_run_is_refused(motif_bins, tmp_path):
    pretrain(motif_bins, tmp_path, ONE_STEP, "--max_iters=2", "--eval_interval=100")
    before, log = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_bytes()
    p = pretrain(motif_bins, tmp_path, ONE_STEP, "--max_iters=2", "--eval_interval=100", check=False)
    assert p.returncode != 0 and "--init_from=resume" in p.stderr and "--overwrite=True" in p.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == before and (tmp_path / "log.jsonl").read_bytes() == log
    # told: it starts over
    pretrain(motif_bins, tmp_path, ONE_STEP, "--max_iters=1", "--eval_interval=100", "--overwrite=True")
    assert ck.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 1


def test_training_without_validation_data_checkpoints_every_eval_interval(motif_bins, tmp_path):
    run_script("pretrain.py", *TINY_PRETRAIN, ONE_STEP, f"--train_data={motif_bins / 'train.bin'}", "--val_data=",
               f"--out_dir={tmp_path}", "--max_iters=5", "--eval_interval=2")
    assert saved_at(tmp_path) == [2, 4, 5]


def test_mixing_weights_need_one_weight_per_training_file(motif_bins, tmp_path):
    train = f"{motif_bins / 'train.bin'},{motif_bins / 'train.bin'}"
    p = pretrain(motif_bins, tmp_path, f"--train_data={train}", "--train_weights=1", check=False)
    assert p.returncode != 0 and "want one weight >= 0 per training file" in p.stderr and "2 files" in p.stderr
    assert not (tmp_path / "ckpt.pt").exists() and "Traceback" not in p.stderr


def test_configurator_refuses_none_and_a_bad_dtype_by_name(motif_bins, tmp_path):
    p = run_script("pretrain.py", "--batch_size=None", check=False)
    assert p.returncode != 0 and "--batch_size=None" in p.stderr and "Traceback" not in p.stderr
    p = pretrain(motif_bins, tmp_path, "--dtype=fp16", check=False)
    assert p.returncode != 0 and "dtype must be one of" in p.stderr and "'fp16'" in p.stderr


@pytest.mark.slow
def test_killed_runs_resume_to_the_weights_of_a_straight_run(motif_bins, tmp_path):
    """Killed in a save or between saves, resumed: every iteration logged once and the straight run's weights, with
    dropout on (so the RNG state came back too)."""
    sched = [ONE_STEP, "--max_iters=60", "--eval_interval=4", "--lr_decay_iters=60", "--dropout=0.1"]
    pretrain(motif_bins, tmp_path / "straight", *sched)
    # killed in the middle of its third save (iteration 12) by the fault injector tests/faults/sitecustomize.py:
    # ckpt.pt still holds iteration 8, whole
    env = dict(ENV, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "faults"), ROOT]), KILL_AT_SAVE="3")
    out = tmp_path / "killed_in_save"
    p = pretrain(motif_bins, out, *sched, check=False, env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert ck.load(str(out / "ckpt.pt"))["iter_num"] == 8 and any(".tmp." in f for f in os.listdir(out))
    # killed at an iteration between saves, by the test, once the log shows iteration 14 (the run goes on a few
    # iterations more before the signal lands, but not to the end)
    out2 = tmp_path / "killed_between"
    cmd = [sys.executable, "pretrain.py", *TINY_PRETRAIN, f"--train_data={motif_bins / 'train.bin'}",
           f"--val_data={motif_bins / 'val.bin'}", f"--out_dir={out2}", *sched]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, log = time.time() + 120, out2 / "log.jsonl"
    while time.time() < deadline and not (log.exists() and max(train_losses(out2), default=0) >= 14):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert 12 <= ck.load(str(out2 / "ckpt.pt"))["iter_num"] < 60
    straight = ck.load(str(tmp_path / "straight" / "ckpt.pt"))["model"]
    for killed in (out, out2):
        pretrain(motif_bins, killed, *sched, "--init_from=resume")
        assert not any(".tmp." in f for f in os.listdir(killed))  # the dead writer's temp file is gone
        rows = [r["iter"] for r in runlog.read_jsonl(str(killed / "log.jsonl")) if "loss" in r]
        assert rows == list(range(60))  # every iteration once
        for k, v in ck.load(str(killed / "ckpt.pt"))["model"].items():
            assert torch.allclose(v, straight[k], atol=1e-6, rtol=0), (killed.name, k)


# ---- the demo recipe: the same losses with 1 and 2 threads ------------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokens(tmp_path_factory):
    """Token files shaped like the demo's (vocab 8,000) with structure to learn: motifs in random order."""
    return write_motif_bins(tmp_path_factory.mktemp("demo_bins"), 8000, 8000, n_motifs=200, max_len=30,
                            n_draws=3000, n_val=20_000)


def demo_losses(data, out_dir, threads, dtype):
    run_script("pretrain.py", "config/demo_cpu.py", f"--train_data={data / 'train.bin'}",
               f"--val_data={data / 'val.bin'}", f"--out_dir={out_dir}", "--max_iters=4", "--eval_iters=1",
               f"--num_threads={threads}", f"--dtype={dtype}", "--compile=False", "--warmup_iters=1")
    rows = runlog.read_jsonl(os.path.join(out_dir, "log.jsonl"))
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


# float32: a sum taken in another order (other threads, other SIMD widths) differs in the 7th digit; over 4
# steps that stays far below 1e-4 nats. bfloat16 autocast rounds every matmul output to 8 bits of mantissa
# (relative 4e-3), so a changed summation order can flip roundings: 2e-2 nats.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@pytest.mark.slow
def test_demo_recipe_trains_the_same_model_with_one_or_two_threads(demo_tokens, tmp_path):
    dtype = precision.cpu_fast_path(precision.cpu_features())[0]  # what the demo trains in on this CPU
    one = demo_losses(demo_tokens, tmp_path / "t1", 1, dtype)
    two = demo_losses(demo_tokens, tmp_path / "t2", 2, dtype)
    assert len(one[0]) == len(two[0]) == 4
    assert one[0][-1] < one[0][0] - 0.1  # it trained: equal losses are not the untouched initial model's
    for a, b in zip(one[0] + one[1], two[0] + two[1]):
        assert abs(a - b) <= TOLERANCE[dtype], (one, two)


def test_a_lora_checkpoint_to_start_from_is_refused_naming_the_merged_model(motif_bins, tmp_path):
    # what sft.py saves with --lora_rank: the adapters only (checkpoint.training_state), on top of its base_ckpt;
    # the shape and vocabulary of TINY_PRETRAIN on motif_bins, so only the missing weights can be refused
    model = apply_lora(tiny_model(0, max_seq_len=32, vocab_size=256), rank=2, alpha=4.0, targets="wq,wv")
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = ck.training_state(model, optim, torch.amp.GradScaler("cpu", enabled=False), [rng_state()],
                              model_args=dict(model.args.__dict__), iter_num=3, config={},
                              init_ckpt=str(tmp_path / "base.pt"))
    assert "lora" in state and "model" not in state
    checkpoint_io.save(str(tmp_path / "lora.pt"), state)
    p = pretrain(motif_bins, tmp_path / "run", f"--init_ckpt={tmp_path / 'lora.pt'}", "--max_iters=2", check=False)
    assert p.returncode != 0 and "holds LoRA adapters, not whole weights" in p.stderr and "merged.pt" in p.stderr
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_a_uint32_corpus_pretrains_resumes_and_is_evaluated(tmp_path):
    """A 70,000-id byte-level BPE trained here with `tokenizers` (so uint32 token files, ids above 65,535):
    data_process.py writes its corpus, pretrain.py trains on it and resumes, eval.py --mode=ppl scores its val.bin,
    counting the characters of the very documents that went to val (so every id was read and decoded right)."""
    path, lines = train_wide_byte_level(str(tmp_path / "tok"))
    wide = Tokenizer(path)
    docs = [f"{line}{i}" for i, line in enumerate(lines[-42:])]  # the last lines: words merged last, the highest ids
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    bins = tmp_path / "data"
    run_script("data_process.py", f"--input={tmp_path / 'corpus.txt'}", f"--tokenizer_model={path}",
               f"--out_dir={bins}", "--val_fraction=0.3", "--num_workers=1")
    meta = json.loads((bins / "meta.json").read_text(encoding="utf-8"))
    assert wide.vocab_size == 70_004  # 70,000 and our 4 chat tokens
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_004
    assert np.fromfile(bins / "train.bin", dtype=np.uint32).max() > 65_535
    out = tmp_path / "run"
    pretrain(bins, out, "--max_iters=2", "--eval_interval=1", ONE_STEP)
    pretrain(bins, out, "--max_iters=4", "--eval_interval=1", ONE_STEP, "--init_from=resume")
    losses = train_losses(out)
    assert sorted(losses) == [0, 1, 2, 3]
    assert abs(losses[0] - math.log(70_004)) < 0.5  # a fresh model's loss over a 70,004-id vocabulary
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and ckpt["model_args"]["vocab_size"] == 70_004
    assert ckpt["tokenizer_sha256"] == wide.sha256()
    run_script("eval.py", "--mode=ppl", f"--ckpt_path={out / 'ckpt.pt'}", f"--val_data={bins / 'val.bin'}",
               "--val_max_tokens=0", f"--results_file={tmp_path / 'r.json'}", "--device=cpu", "--dtype=float32")
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    val = [d for d in docs if is_val(d, 0.3, 1337)]
    assert r["val_tokens"] == meta["val_tokens"] and r["documents"] == len(val) > 0
    assert r["characters"] == sum(len(d) for d in val) and math.isfinite(r["val_loss"])
