"""babyllama/pairs.py, DPO's pieces, checked by hand: each loss formula on a hand-made example (ORPO finite where a
reply is certain), sequence log-probs over reply tokens only (prompt and padding do not enter), the reference gets
no gradient and does not change (frozen copy, LoRA adapters-off, cached log-probs), batch losses and held-out
metrics, and the stateless pair sampler. The loaders of preference files: test_preferences.py."""
from contextlib import nullcontext
import math

from conftest import A, U, chat_model
import pytest
import torch

from babyllama.lora import adapters_off, apply_lora
from babyllama.models import frozen_copy
from babyllama.pairs import (PairBatches, Reference, collate_pairs, concatenated_logps, dpo_loss, evaluate_pairs,
                             hinge_loss, ipo_loss, orpo_loss, pair_batch_loss, pair_logps, pair_metrics,
                             preference_loss, sequence_logps, simpo_loss, tokenize_pair)
from tokenizer.chat_template import IGNORE, encode_conversation

T = lambda *v: torch.tensor(v, dtype=torch.float64)
softplus = lambda z: math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))  # -log sigmoid(z)
# a pair whose policy moved log p(chosen) from -6 to -5 and log p(rejected) from -6 to -7: h = 2
PC, PR, RC, RR = T(-5.0), T(-7.0), T(-6.0), T(-6.0)


# ---- losses ---------------------------------------------------------------------------------------------

def test_sigmoid_loss_and_rewards_by_hand():
    loss, rc, rr = preference_loss("sigmoid", T(-5.0, -9.0), T(-7.0, -8.0), T(-6.0, -9.5), T(-6.0, -7.0),
                                   T(3, 4), T(3, 4), beta=0.1)
    # pair 1: h = (-5+6) - (-7+6) = 2; pair 2: h = (-9+9.5) - (-8+7) = 1.5
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(-0.15))) / 2)
    assert rc.tolist() == pytest.approx([0.1, 0.05])
    assert rr.tolist() == pytest.approx([-0.1, -0.1])
    m = pair_metrics(loss, T(-5.0, -9.0), T(-7.0, -8.0), rc, rr)
    assert m["rewards/margins"] / 2 == pytest.approx((0.2 + 0.15) / 2)
    assert m["rewards/accuracies"] == 2 and m["logps/chosen"] / 2 == pytest.approx(-7.0)
    assert m["logps/accuracy"] == 1  # the model's own preference: -5 > -7 yes, -9 > -8 no


def test_step0_loss_is_log2_and_rewards_zero():
    lp = torch.randn(5, dtype=torch.float64) * 10
    lr_ = torch.randn(5, dtype=torch.float64) * 10
    loss, rc, rr = preference_loss("sigmoid", lp, lr_, lp.clone(), lr_.clone(), T(1), T(1), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert rc.abs().max() == 0 and rr.abs().max() == 0


def test_variants_by_hand():
    assert dpo_loss(PC, PR, RC, RR, 0.1)[0].item() == pytest.approx(softplus(0.2))
    # conservative DPO: the label is flipped with probability 0.1
    assert dpo_loss(PC, PR, RC, RR, 0.1, 0.1)[0].item() == pytest.approx(0.9 * softplus(0.2) + 0.1 * softplus(-0.2))
    assert ipo_loss(PC, PR, RC, RR, 0.1)[0].item() == pytest.approx((2 - 5) ** 2)
    assert hinge_loss(PC, PR, RC, RR, 0.1)[0].item() == pytest.approx(0.8)
    assert hinge_loss(PC, PR, RC, RR, 1.0)[0].item() == 0.0
    # SimPO: average log-probs -1 (5 tokens) and -3.5 (2 tokens); beta 2, gamma 1: z = 2 * 2.5 - 1 = 4
    loss, rc, rr = preference_loss("simpo", PC, PR, None, None, T(5), T(2), beta=2.0, simpo_gamma=1.0)
    assert loss.item() == pytest.approx(softplus(4.0))
    assert (rc.item(), rr.item()) == pytest.approx((-2.0, -7.0))
    # ORPO: NLL of chosen (1 per token) + beta * -log sigmoid(log odds(e^-1) - log odds(e^-3.5))
    log_odds = lambda a: a - math.log(1 - math.exp(a))
    loss, _, _ = preference_loss("orpo", PC, PR, None, None, T(5), T(2), beta=0.1)
    assert loss.item() == pytest.approx(1.0 + 0.1 * softplus(log_odds(-1.0) - log_odds(-3.5)))
    assert orpo_loss(T(-1.0), T(-3.5), 0.1)[0].item() == pytest.approx(loss.item())
    assert simpo_loss(T(-1.0), T(-3.5), 2.0, 1.0)[0].item() == pytest.approx(softplus(4.0))
    # the SFT term: + weight * mean NLL per chosen token (5 tokens, log-prob -5 in all)
    loss, _, _ = preference_loss("sigmoid", PC, PR, RC, RR, T(5), T(2), beta=0.1, sft_weight=0.5)
    assert loss.item() == pytest.approx(softplus(0.2) + 0.5 * 1.0)


def test_dpo_gradient_direction():
    pc, pr = T(-5.0).requires_grad_(), T(-7.0).requires_grad_()
    loss, _, _ = preference_loss("sigmoid", pc, pr, RC, RR, T(1), T(1), beta=0.1)
    loss.backward()
    # d/dh -log s(beta h) = -beta * s(-beta h): raise chosen, lower rejected
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))
    assert pr.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.2)))


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


# ---- sequences --------------------------------------------------------------------------------------------

PAIRS = [
    {"system": None, "prompt": [U("《静夜思》的作者是谁？")], "chosen": "《静夜思》的作者是李白。",
     "rejected": "《静夜思》的作者是王之涣。"},
    {"system": "你是诗人。", "prompt": [U("请写一首题为《静夜思》的诗。"), A("床前明月光。"), U("续写：")],
     "chosen": "疑是地上霜。举头望明月，低头思故乡。", "rejected": "疑是地上霜。"},
]


def test_tokenize_pair_matches_chat_template(tiny_tok):
    for p in PAIRS:
        prompt, c, r, truncated = tokenize_pair(tiny_tok, p, 1000)
        assert not truncated
        ids, labels = encode_conversation(tiny_tok, p["prompt"] + [A(p["chosen"])], p["system"])
        assert prompt + c == ids  # the same tokens the SFT model was trained on
        assert labels[len(prompt):] == c  # the final reply (content + <|end|>) is what SFT scores last
    prompt, c, r, truncated = tokenize_pair(tiny_tok, PAIRS[1], 19)  # at most max_seq_len + 1 = 20 tokens
    assert truncated and len(prompt) + len(c) <= 20 and len(prompt) + len(r) <= 20


def test_logps_cover_reply_tokens_only(tiny_tok):
    model, _ = chat_model(tiny_tok)
    model.eval()
    items = [tokenize_pair(tiny_tok, p, 1000)[:3] for p in PAIRS]
    x, y = collate_pairs(items, pad_id=0)
    assert x.shape[0] == 4  # chosen rows, then rejected rows, in one batch
    with torch.no_grad():
        lc, lr_, nc, nr = concatenated_logps(model, x, y)
        for b, (prompt, c, r) in enumerate(items):
            for reply, got, n in ((c, lc[b], nc[b]), (r, lr_[b], nr[b])):
                seq = torch.tensor([prompt + reply])
                logp = torch.log_softmax(model(seq[:, :-1])[0].float(), -1)[0]
                # by hand: the reply token at position t is predicted from position t - 1
                want = sum(logp[t - 1, seq[0, t]].item() for t in range(len(prompt), len(prompt) + len(reply)))
                assert got.item() == pytest.approx(want, abs=1e-4)
                assert n.item() == len(reply)
        # the prompt's tokens and the padding are -1 targets: changing them changes nothing but the prompt's
        # influence on the reply (context) -- so change only padding: other pad ids, longer padding
        x2, y2 = collate_pairs(items + [(items[1][0], items[1][1] + items[1][1][:8], items[1][2])], pad_id=5)
        assert x2.shape[1] > x.shape[1]
        lc2, lr2, _, _ = concatenated_logps(model, x2, y2)
        assert torch.allclose(lc2[:2], lc, atol=1e-5) and torch.allclose(lr2[:2], lr_, atol=1e-5)
    # prompt targets never scored: zeroing the logits' rows at prompt positions leaves the sums unchanged
    logits = torch.randn(*x.shape, tiny_tok.vocab_size)
    base, _ = sequence_logps(logits, y)
    hit = logits.clone()
    hit[y == IGNORE] = 1e4 * torch.randn_like(hit[y == IGNORE])
    assert torch.allclose(sequence_logps(hit, y)[0], base)


def test_reference_frozen_copy_gets_no_gradient(tiny_tok):
    policy, args = chat_model(tiny_tok)
    ref = frozen_copy(args, policy.state_dict(), "cpu")
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    x, y = collate_pairs([tokenize_pair(tiny_tok, p, 1000)[:3] for p in PAIRS], 0)
    for step in range(6):
        with torch.no_grad():
            rc, rr, _, _ = concatenated_logps(ref, x, y)
        pc, pr, nc, nr = concatenated_logps(policy, x, y)
        loss, _, _ = preference_loss("sigmoid", pc, pr, rc, rr, nc, nr, beta=0.1)
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not torch.equal(before["layers.0.attention.wq.weight"], policy.layers[0].attention.wq.weight)
    assert loss.item() < math.log(2)  # the loss of the 6th step: 5 updates in, the policy prefers chosen


def test_lora_reference_is_base_with_adapters_off(tiny_tok):
    model, args = chat_model(tiny_tok)
    original = frozen_copy(args, model.state_dict(), "cpu")
    apply_lora(model, rank=4, alpha=8)
    x, y = collate_pairs([tokenize_pair(tiny_tok, p, 1000)[:3] for p in PAIRS], 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        with torch.no_grad(), adapters_off(model):
            rc, rr, _, _ = concatenated_logps(model, x, y)
        pc, pr, nc, nr = concatenated_logps(model, x, y)
        preference_loss("sigmoid", pc, pr, rc, rr, nc, nr, beta=0.1)[0].backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = concatenated_logps(original, x, y)[:2]
        with adapters_off(model):
            off = concatenated_logps(model, x, y)[:2]
        on = concatenated_logps(model, x, y)[:2]
    assert torch.allclose(off[0], want[0], atol=1e-5) and torch.allclose(off[1], want[1], atol=1e-5)
    assert not torch.allclose(on[0], want[0], atol=1e-3)  # the adapters did learn
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ---- the reference, batches and held-out metrics (what dpo.py's loop is made of) ---------------------------

MORE = PAIRS + [
    {"system": None, "prompt": [U("续写：白日依山尽，")], "chosen": "黄河入海流。", "rejected": "白日依山尽。", "kind": "continue"},
    {"system": None, "prompt": [U("What is two plus two?")], "chosen": "It is four.", "rejected": "It is two.",
     "kind": "continue"},
]
LOSS = dict(beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, sft_weight=0.0)


def test_step0_batch_loss_is_log2_for_every_kind_of_reference(tiny_tok):
    """At step 0 the policy is the reference: with a frozen copy, with the LoRA policy's adapters switched off
    and with cached log-probs, the loss is log 2 and every reward 0."""
    model, args = chat_model(tiny_tok)
    items = [tokenize_pair(tiny_tok, p, 63)[:3] for p in MORE]
    idx = [0, 1, 2, 3]
    cache = {"train": pair_logps(model.eval(), items, idx, 0, "cpu", nullcontext())}
    lora_model, _ = chat_model(tiny_tok)
    apply_lora(lora_model, rank=4, alpha=8)
    for p in lora_model.parameters():  # an adapter that has learned something: B no longer zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    refs = [(model, Reference("model", frozen_copy(args, model.state_dict(), "cpu"))),
            (model, Reference("cached", cache=cache)),
            (lora_model, Reference("adapters_off", lora_model))]
    for policy, ref in refs:
        want_log2 = ref.mode != "adapters_off"
        loss, m, n_tok = pair_batch_loss(policy, ref, items, idx, "train", 0, "cpu", nullcontext(), "sigmoid", **LOSS)
        if want_log2:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5), ref.mode
            assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and m["rewards/accuracies"] == 0
        assert n_tok == sum(len(p) + len(c) - 1 + len(p) + len(r) - 1 for p, c, r in items)
    # adapters off, the LoRA policy's reference log-probs are the base model's
    base = frozen_copy(args, chat_model(tiny_tok)[0].state_dict(), "cpu")
    x, y = collate_pairs(items, 0)
    got = Reference("adapters_off", lora_model).logps(x, y, "train", torch.tensor(idx))
    want = concatenated_logps(base, x, y)[:2]
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    assert lora_model.training  # the reference pass restores the policy's mode


def test_cached_reference_equals_frozen_copy_after_the_policy_moved(tiny_tok):
    model, args = chat_model(tiny_tok)
    items = [tokenize_pair(tiny_tok, p, 63)[:3] for p in MORE]
    frozen = Reference("model", frozen_copy(args, model.state_dict(), "cpu"))
    cached = Reference("cached", cache={"train": pair_logps(model.eval(), items, [0, 1, 2, 3], 0, "cpu",
                                                            nullcontext())})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = pair_batch_loss(model, frozen, items, [0, 1, 2, 3], "train", 0, "cpu", nullcontext(), "sigmoid",
                               **LOSS)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
    for idx in ([2, 0], [3, 1, 1]):
        a = pair_batch_loss(model, frozen, items, idx, "train", 0, "cpu", nullcontext(), "sigmoid", **LOSS)
        b = pair_batch_loss(model, cached, items, idx, "train", 0, "cpu", nullcontext(), "sigmoid", **LOSS)
        assert a[0].item() == pytest.approx(b[0].item(), abs=1e-5)
        assert a[1]["rewards/margins"] == pytest.approx(b[1]["rewards/margins"], abs=1e-5)
    assert a[0].item() < math.log(2)  # the policy moved toward the chosen replies


def test_held_out_metrics_weight_every_pair_equally_whatever_the_batch(tiny_tok):
    model, args = chat_model(tiny_tok)
    ref = Reference("model", frozen_copy(args, model.state_dict(), "cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    items = [tokenize_pair(tiny_tok, p, 63)[:3] for p in MORE]
    kinds = [p.get("kind") for p in MORE]
    one = evaluate_pairs(model, ref, items, kinds, 1, 0, "cpu", nullcontext(), "sigmoid", **LOSS)
    three = evaluate_pairs(model, ref, items, kinds, 3, 0, "cpu", nullcontext(), "sigmoid", **LOSS)
    for k, v in one.items():
        if k != "logps/accuracy_by_kind":
            assert three[k] == pytest.approx(v, abs=1e-5), k
    # by hand: the mean over the 4 pairs of each pair's own loss and logp preference
    x, y = collate_pairs(items, 0)
    with torch.no_grad():
        pc, pr, _, _ = concatenated_logps(model, x, y)
        rc, rr, _, _ = concatenated_logps(ref.net, x, y)
    h = (pc - rc) - (pr - rr)
    assert one["loss"] == pytest.approx(torch.nn.functional.softplus(-0.1 * h).mean().item(), abs=1e-5)
    assert one["logps/accuracy"] == pytest.approx((pc > pr).float().mean().item())
    assert one["logps/accuracy_by_kind"] == {"continue": pytest.approx((pc[2:] > pr[2:]).float().mean().item())}
    model.train()
    evaluate_pairs(model, ref, items[:1], None, 1, 0, "cpu", nullcontext(), "sigmoid", **LOSS)
    assert model.training  # evaluated in eval mode (no dropout), then put back in the mode it was in


def test_pair_batches_are_stateless_permutations():
    a, b = PairBatches(7, 3, seed=5), PairBatches(7, 3, seed=5)
    first = [a.get(m) for m in range(7)]  # 21 positions: three epochs of 7 pairs
    assert [b.get(m) for m in reversed(range(7))] == list(reversed(first))  # order of asking does not matter
    flat = [i for m in first for i in m]
    for e in range(3):
        assert sorted(flat[7 * e:7 * e + 7]) == list(range(7))  # each epoch visits every pair once
    assert flat[:7] != flat[7:14]  # and epochs are shuffled differently
    assert PairBatches(7, 3, seed=6).get(0) != first[0] or PairBatches(7, 3, seed=6).get(1) != first[1]
