"""babyllama/reward_model.py, the Bradley-Terry reward model: the loss and accuracy on a hand-made batch, and the
reward read at a sequence's last real token whatever the padding of its batch."""
import math

from conftest import tiny_model
import pytest
import torch

from babyllama.reward_model import RewardModel, bt_loss


def test_bradley_terry_loss_and_accuracy_on_a_hand_made_batch():
    rc, rr = torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 3.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1, -1, 0
    assert bt_loss(rc, rr).tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)),
                                                      math.log(2)])
    assert bt_loss(rc, rr, margin=0.5).tolist() == pytest.approx([math.log(1 + math.exp(-0.5)),
                                                                  math.log(1 + math.exp(1.5)), math.log(1 + math.exp(0.5))])
    assert (rc > rr).float().mean().item() == pytest.approx(1 / 3)  # a tie is not a win


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    rm = RewardModel(tiny_model(0, dim=32, n_kv_heads=None, vocab_size=50, max_seq_len=32)).eval()
    short, long = [1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14, 15]
    with torch.no_grad():
        alone = rm([short], "cpu")
        padded = rm([short, long], "cpu")
        h = rm.body._forward_positions(torch.tensor([short]), torch.arange(4)[None], None, head=False)
        by_hand = rm.head(h[0, -1]).item()
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5) == pytest.approx(by_hand, abs=1e-5)
    assert padded[1].item() != pytest.approx(padded[0].item(), abs=1e-3)

