"""ppo.py as users run it: with a value model started from a reward model's head it teaches a tiny model the
rewarded token (the held-out reward rises) and saves the value model for a resume; it runs on two processes."""
import json

import pytest
import torch

from babyllama import checkpoint_io
from babyllama.models import load_model
from babyllama.reward_model import RewardModel
from conftest import TWO_PROCESSES, run_script


def value_checkpoint(d, path):
    """A value model for ppo.py: a reward model (a fresh head) on the tiny SFT model at d."""
    body, c = load_model(str(d / "sft.pt"))
    torch.manual_seed(0)
    checkpoint_io.save(str(path), {"model": RewardModel(body).state_dict(), "model_args": c["model_args"]})
    return path



def test_ppo_teaches_a_tiny_model_the_rewarded_token(rl_files, tmp_path):
    d, args = rl_files
    keep = [a for a in args if not a.startswith(("--group_size", "--prompts_per_iter", "--minibatch_size", "--beta"))]
    run_script("ppo.py", *keep, f"--value_ckpt={value_checkpoint(d, tmp_path / 'value.pt')}",
               f"--out_dir={tmp_path / 'ppo'}",
               "--prompts_per_iter=16", "--minibatch_size=8", "--max_iters=20", "--eval_interval=20",
               "--value_learning_rate=1e-2", "--kl_coef=0.0")
    s = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert s["held_out"]["after"]["reward"] - s["held_out"]["before"]["reward"] >= 0.3
    saved = torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=True)
    assert any(k.startswith("head.") for k in saved["value_model"])  # the value model is saved for resume



@pytest.mark.slow
def test_ppo_runs_on_two_processes(rl_files, tmp_path):
    # one micro-step per process: setup_run is told the world size (it once refused any torchrun launch)
    d, args = rl_files
    keep = [a for a in args if not a.startswith(("--group_size", "--prompts_per_iter", "--minibatch_size", "--beta"))]
    run_script("ppo.py", *keep, f"--value_ckpt={value_checkpoint(d, tmp_path / 'v.pt')}", "--prompts_per_iter=2",
               "--minibatch_size=2", "--max_iters=2", "--eval_interval=2", f"--out_dir={tmp_path / 'ppo'}",
               launcher=TWO_PROCESSES)
    assert json.loads((tmp_path / "ppo" / "summary.json").read_text())["iter"] == 2
