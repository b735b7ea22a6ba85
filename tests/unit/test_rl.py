"""babyllama/rl.py, the RL algorithms' tensors, against hand-computed values: group advantages (GRPO, Dr. GRPO),
the k3 KL estimate, the clipped objective (per token and per sequence, with the KL penalty), GAE and the clipped
value loss, and reply log-probs equal to the plain forward's."""
import math

from conftest import tiny_model
import pytest
import torch

from babyllama.rl import gae, group_advantages, k3_kl, policy_loss, reply_logps, value_loss

SMALL_RL = dict(dim=32, n_kv_heads=None, vocab_size=50, max_seq_len=32)


def test_group_advantages_are_zero_mean_per_group_and_zero_for_equal_rewards():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    std = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 4)  # population std of 1, 2, 3, 4
    assert a[:4].tolist() == pytest.approx([-1.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4),
                                            1.5 / (std + 1e-4)])
    assert a[4:].tolist() == [0, 0, 0, 0] and abs(float(a[:4].sum())) < 1e-6
    assert group_advantages(r, 4, normalize=False)[:4].tolist() == [-1.5, -0.5, 0.5, 1.5]  # Dr. GRPO


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # q = log(0.25 / 0.5) = -log 2: e^q - q - 1 = 0.5 + log 2 - 1; equal distributions give 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])


def test_clipped_objective_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))  # ratios 1.5, 0.5, 0.5 (old log-probs 0)
    mask = torch.ones(1, 3)
    # token 1: A = 2, min(1.5*2, 1.2*2) = 2.4; token 2: A = 2, min(0.5*2, 0.8*2) = 1.0; token 3: A = -1,
    # min(-0.5, -0.8) = -0.8. Loss = -(2.4 + 1.0 - 0.8) = -2.6; the first two ratios lie outside [0.8, 1.2]
    adv = torch.tensor([[2.0, 2.0, -1.0]])
    loss, st = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-2.6) and st["clipped"] == 3 and st["tokens"] == 3
    # sequence aggregation: the reply's token mean; a masked token counts nowhere
    loss, _ = policy_loss(logp, old, adv, torch.tensor([[1.0, 1.0, 0.0]]), clip_eps=0.2, aggregation="sequence")
    assert float(loss) == pytest.approx(-(2.4 + 1.0) / 2)
    # the KL penalty adds beta * k3 per token
    ref = logp - 0.1
    loss, st = policy_loss(logp, old, adv, mask, 0.2, beta=0.5, ref_logp=ref)
    assert float(loss) == pytest.approx(-2.6 + 0.5 * 3 * (math.exp(-0.1) + 0.1 - 1))


def test_gae_and_value_loss_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 4th step is padding: its value must not leak in
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # delta2 = 1 - 0.7 = 0.3; A2 = 0.3; delta1 = 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.9 * 0.3 = 0.37;
    # delta0 = 0.6 - 0.5 = 0.1, A0 = 0.1 + 0.9 * 0.37 = 0.433
    assert adv[0].tolist() == pytest.approx([0.433, 0.37, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.933, 0.97, 1.0, 0.0])
    # value loss: V = 1.0 from old 0.5 with returns 0.2: max((0.8)^2, (0.7 - 0.2)^2) / 2 = 0.32
    assert float(value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[0.2]]),
                            torch.tensor([[1.0]]), clip=0.2)) == pytest.approx(0.32)


def test_reply_logps_are_the_forward_pass_log_probs_of_the_reply_tokens():
    m = tiny_model(0, **SMALL_RL).eval()
    prompts, replies = [[1, 5, 6], [1, 7]], [[8, 9], [10, 11, 12]]
    torch.set_grad_enabled(False)
    try:
        check_reply_logps(m, prompts, replies)
    finally:
        torch.set_grad_enabled(True)


def check_reply_logps(m, prompts, replies):
    logp, mask, ent = reply_logps(m, prompts, replies, 0, "cpu", with_entropy=True)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for b, (p, r) in enumerate(zip(prompts, replies)):
        full = m(torch.tensor([p + r]))[0][0].log_softmax(-1)
        want = [full[len(p) - 1 + i, t].item() for i, t in enumerate(r)]
        assert logp[b, :len(r)].tolist() == pytest.approx(want, abs=1e-5)
        assert float(ent[b, 0]) == pytest.approx(float(-(full[len(p) - 1].exp() * full[len(p) - 1]).sum()), abs=1e-5)

