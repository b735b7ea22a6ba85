"""babyllama/rl_run.py, the RL scripts' start: the policy trains (optimizer steps on the clipped loss with the KL
term) while the reference, a frozen copy sharing no storage with it and outside the optimizer, stays the starting
checkpoint's weights."""
import torch

from babyllama import checkpoint_io, optimize, rl_run
from babyllama.dist import Run
from babyllama.precision import amp_setup
from babyllama.rl import minibatch_policy_loss, reply_logps


def test_the_reference_keeps_the_starting_weights_while_the_policy_trains(rl_files):
    # the RL scripts' start and optimizer steps on the clipped loss with the KL term: the policy moves, pi_ref
    # (a frozen copy, no storage shared with the policy, outside the optimizer) stays the starting checkpoint's
    d, _ = rl_files
    autocast, scaler = amp_setup("cpu", "float32")
    run = Run(autocast=autocast, scaler=scaler)
    raw_model, _, optim, model, ref, _ = rl_run.policy_and_reference(str(d / "sft.pt"), None, run, 0, 0.0, 1e-2,
                                                                     (0.9, 0.95))
    prompts, replies = [[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]]
    with torch.no_grad():
        old, _, _ = reply_logps(raw_model, prompts, replies, 0, "cpu")
        ref_logp, _, _ = reply_logps(ref, prompts, replies, 0, "cpu")
    for _ in range(3):
        loss, _ = minibatch_policy_loss(model, prompts, replies, [0, 1], old, ref_logp, torch.tensor([1.0, -1.0]), 0,
                                        "cpu", beta=0.5)
        loss.backward()
        optimize.optimizer_step(optim, scaler, 1.0)
    start = checkpoint_io.load(str(d / "sft.pt"))["model"]
    assert all(torch.equal(start[k], v) for k, v in ref.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in raw_model.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters())

