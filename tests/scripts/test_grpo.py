"""grpo.py as users run it: it teaches a tiny model the rewarded token (the held-out reward rises), the run stopped
half-way and resumed ends with the straight run's weights, and it runs on two processes."""
import json

import pytest
import torch

from conftest import TWO_PROCESSES, run_script


def test_grpo_teaches_a_tiny_model_the_rewarded_token_and_resumes_exactly(rl_files):
    d, args = rl_files
    run_script("grpo.py", *args, f"--out_dir={d / 'learn'}", "--max_iters=20", "--eval_interval=20")
    s = json.loads((d / "learn" / "summary.json").read_text())
    before, after = s["held_out"]["before"]["reward"], s["held_out"]["after"]["reward"]
    assert after - before >= 0.3  # the share of "月" in the greedy replies
    start = torch.load(d / "sft.pt", weights_only=True)["model"]
    end = torch.load(d / "learn" / "ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the policy did move
    # the same run stopped at iteration 10 and resumed: the weights of the straight run (evaluations, which
    # differ between the two, draw no random numbers)
    run_script("grpo.py", *args, f"--out_dir={d / 'halves'}", "--max_iters=10", "--eval_interval=10")
    run_script("grpo.py", *args, f"--out_dir={d / 'halves'}", "--max_iters=20", "--eval_interval=10",
               "--init_from=resume")
    halves = torch.load(d / "halves" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(end[k], halves[k]) for k in end)



@pytest.mark.slow
def test_grpo_runs_on_two_processes(rl_files, tmp_path):
    # one micro-step per process: setup_run is told the world size (it once refused any torchrun launch)
    d, args = rl_files
    keep = [a for a in args if not a.startswith(("--group_size", "--prompts_per_iter", "--minibatch_size"))]
    run_script("grpo.py", *keep, "--group_size=4", "--prompts_per_iter=1", "--minibatch_size=4", "--max_iters=2",
               "--eval_interval=2", f"--out_dir={tmp_path / 'grpo'}", launcher=TWO_PROCESSES)
    assert json.loads((tmp_path / "grpo" / "summary.json").read_text())["iter"] == 2
