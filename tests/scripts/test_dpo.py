"""dpo.py as users run it, on a tiny model: step 0 is log 2 with zero rewards, files in the formats people
download are read, a resumed run with the cached reference continues the losses of an uninterrupted run with a
frozen copy, LoRA (reference = adapters off) runs end to end, checkpoints are written as always_save_checkpoint
says (as in sft.py), the gradient does not depend on how a batch is split, and HSDP with Muon gives the run of one
process. The pieces are tested one by one in tests/unit/test_pairs.py."""
import json
import math
import os
import shutil

import pytest
import torch

from babyllama import models, runlog
from conftest import (CPU, TWO_PROCESSES, assert_same_gradient_however_the_batch_is_split, assert_same_run, finetune,
                      run_script, saved_at, write_jsonl)


@pytest.fixture(scope="module")
def setup(chat_files, tmp_path_factory):
    """A folder with pairs in the formats people download (train.jsonl) and held-out pairs (val.json); the runs
    start from chat_files' base.pt."""
    d = tmp_path_factory.mktemp("dpo_run")
    train = [  # the formats of ../shared/data/dpo and TRL's, mixed in one file
        {"prompt": "《静夜思》的作者是谁？", "chosen": "李白。", "rejected": "王之涣。"},
        {"conversations": [{"from": "human", "value": "续写：床前明月光，"}], "chosen": "疑是地上霜。",
         "rejected": "床前明月光。"},
        {"conversations": [{"from": "human", "value": "请写一首题为《登鹳雀楼》的诗。"}],
         "chosen": {"from": "gpt", "value": "白日依山尽，黄河入海流。"}, "rejected": {"from": "gpt", "value": "白日依山尽。"}},
        {"prompt": [{"role": "user", "content": "What is two plus two?"}],
         "chosen": [{"role": "assistant", "content": "It is four."}],
         "rejected": [{"role": "assistant", "content": "It is two."}]},
        {"prompt": "同", "chosen": "一样", "rejected": "一样"},  # identical: skipped
    ]
    write_jsonl(d / "train.jsonl", train)
    (d / "val.json").write_text(json.dumps(train[:3], ensure_ascii=False), encoding="utf-8")
    shutil.copy(chat_files / "base.pt", d / "base.pt")
    return d


def run_dpo(d, out, *extra, plots=False):
    p = run_script("dpo.py", f"--init_ckpt={d / 'base.pt'}", f"--train_data={d / 'train.jsonl'}",
                   f"--val_data={d / 'val.json'}", f"--out_dir={out}", "--batch_size=2", *CPU, "--learning_rate=1e-3",
                   "--min_lr=1e-3", "--warmup_iters=0", "--eval_interval=2", "--n_samples=1", *extra, plots=plots)
    return p.stdout, runlog.read_jsonl(os.path.join(out, "log.jsonl"))


def train_rows(log):
    return {r["iter"]: r for r in log if "loss" in r}


@pytest.fixture(scope="module")
def full_run(setup):
    return run_dpo(setup, setup / "full", "--max_iters=4", plots=True)


def test_step0_log2_metrics_plots(setup, full_run):
    out, log = full_run
    rows = train_rows(log)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert rows[0][k] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["rewards/accuracies"] == 0.0  # no pair is strictly preferred yet
    for k in ("logps/chosen", "logps/rejected", "rewards/accuracies"):
        assert k in rows[3]
    assert rows[3]["rewards/margins"] > 0  # lr 1e-3 on 4 pairs: the policy separates them
    val0 = [r for r in log if r.get("iter") == 0 and "val/loss" in r][0]
    assert val0["val/loss"] == pytest.approx(math.log(2), abs=1e-5) and val0["val/rewards/margins"] == 0
    assert "train pairs: {'records': 5, 'kept': 4, 'identical pair': 1" in out
    summary = log[-1]["summary"]
    assert summary["held_out"]["pairs"] == 3 and summary["reference"] == "model"
    assert summary["train_tokens"] > 0 and summary["tokens_per_sec"] > 0
    for name in ("loss.png", "rewards.png", "ckpt.pt", "samples.json"):
        assert os.path.exists(setup / "full" / name)
    # always_save_checkpoint (the default) writes at every evaluation after the start, as sft.py does
    assert saved_at(setup / "full") == [2, 4]
    assert torch.load(setup / "full" / "ckpt.pt", weights_only=True)["config"]["lr_decay_iters"] == 4


def test_without_always_save_only_improvements_and_the_end_are_saved(setup, tmp_path):
    """learning_rate 0: the held-out loss never improves on the first evaluation's, so only the final state is
    written (test_sft.py checks sft.py the same way)."""
    run_dpo(setup, tmp_path, "--max_iters=4", "--learning_rate=0.0", "--min_lr=0.0", "--always_save_checkpoint=False")
    assert saved_at(tmp_path) == [4]


@pytest.mark.slow
def test_cached_reference_and_resume_match_frozen_copy(setup, full_run):
    """Half the run with cached reference log-probs, then resumed (reading the cache back): the losses of
    the uninterrupted run with a frozen reference copy."""
    out = setup / "cached"
    run_dpo(setup, out, "--max_iters=2", "--reference=cached")
    assert os.path.exists(out / "ref_logps.pt")
    stdout, log = run_dpo(setup, out, "--max_iters=4", "--reference=cached", "--init_from=resume")
    # the resumed run read the pairs of its first half from the file and computed only the new ones
    assert "pairs computed" in stdout and "read from" in stdout and " 0 read from" not in stdout
    a, b = train_rows(full_run[1]), train_rows(log)
    assert sorted(b) == [0, 1, 2, 3]
    for it in range(4):
        assert b[it]["loss"] == pytest.approx(a[it]["loss"], abs=1e-5)
        assert b[it]["rewards/margins"] == pytest.approx(a[it]["rewards/margins"], abs=1e-5)


def test_lora_reference_adapters_off(setup):
    out, log = run_dpo(setup, setup / "lora", "--max_iters=2", "--lora_rank=4", "--lora_alpha=8.0")
    assert "reference: adapters_off" in out
    assert train_rows(log)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    model, ckpt = models.load_model(str(setup / "lora" / "ckpt.pt"))
    assert "lora" in ckpt and ckpt["lora_config"]["alpha"] == 8.0 and os.path.exists(setup / "lora" / "merged.pt")


def test_gradient_is_the_same_however_the_batch_is_split(chat_files, tmp_path):
    extra = [f"--train_data={chat_files / 'pairs.jsonl'}", "--sft_weight=0.5", "--learning_rate=1e-3"]
    assert_same_gradient_however_the_batch_is_split("dpo.py", chat_files, tmp_path, extra)


def test_hsdp_with_muon_on_two_processes_equals_one_process(chat_files, tmp_path):
    # replicas=2: a (2 x 1) mesh, each process a whole shard group, the two replicated (HSDP's cross-node half)
    dpo = [f"--train_data={chat_files / 'pairs.jsonl'}", "--n_samples=0", "--sft_weight=0.5", "--optimizer=muon"]
    finetune("dpo.py", chat_files, tmp_path / "one", *dpo)
    finetune("dpo.py", chat_files, tmp_path / "fsdp", *dpo, "--parallel=fsdp", "--replicas=2", launcher=TWO_PROCESSES)
    # the losses agree to float rounding. The weights less: the runs' gradients differ in the last bits (another
    # summation order), and Newton-Schulz, run in bf16, lifts every singular direction of the momentum to ~1,
    # the tiny ones made of rounding noise too, so an entry may differ by a fraction of one step's update
    # (~5e-3 here: lr 3e-3 x 0.2 x sqrt(176)); up to 2.8e-4 after 6 steps in a pretraining run
    assert_same_run(tmp_path / "one", "ckpt.pt", tmp_path / "fsdp", "ckpt.dcp", 1e-5, weight_tol=1e-3)
