"""Independent reference tests for Transformer.generate / generate_stream and training.

The reference for every decoding test is a plain loop written here: run the
model on the whole (unpadded) sequence, take the last position's logits,
optionally apply the CTRL / Hugging Face repetition penalty, take argmax.
"""
import math

import pytest
import torch

from babyllama.generate import generate, generate_stream
from babyllama.optimize import configure_optimizers
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest.py)


def make_args(**overrides):
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
              ffn_dim_multiplier=None, norm_eps=1e-5, max_seq_len=64, dropout=0.0,
              tie_embeddings=True, rope_theta=10000.0)
    kw.update(overrides)
    return ModelArgs(**kw)


def make_model(seed=0, std=0.1, **overrides):
    """Random model whose logits are well spread (std 0.1 matrices rather than
    the 0.02 init), so greedy argmax is never decided by float round-off."""
    torch.manual_seed(seed)
    model = Transformer(make_args(**overrides))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def random_prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def right_pad(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, : len(p)] = torch.tensor(p)
    return idx


def as_lists(out):
    return [[int(t) for t in row] for row in out]


@torch.no_grad()
def reference_greedy(model, prompt, max_new_tokens, repetition_penalty=1.0, stop_ids=None,
                     _variant=None):
    """Full recomputation, one unpadded prompt, greedy. Repetition penalty as in
    CTRL / HF RepetitionPenaltyLogitsProcessor: for every token id present in
    prompt + generated so far, logit > 0 -> logit / penalty, logit < 0 -> logit * penalty.
    _variant selects a deliberately WRONG rule, only used to show that the
    repetition-penalty test can tell the correct rule from plausible mistakes."""
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq], dtype=torch.long))
        last = logits[0, -1].double().clone()
        if repetition_penalty != 1.0:
            present = set(seq)
            if _variant == "generated_only":
                present = set(out)
            elif _variant == "pad_counted":
                present = present | {0}
            if present:
                ids = torch.tensor(sorted(present), dtype=torch.long)
                v = last[ids]
                if _variant == "always_divide":
                    last[ids] = v / repetition_penalty
                else:
                    last[ids] = torch.where(v > 0, v / repetition_penalty, v * repetition_penalty)
        nxt = int(torch.argmax(last))
        out.append(nxt)
        seq.append(nxt)
        if stop_ids is not None and nxt in stop_ids:
            break
    return out


LENGTHS = [3, 7, 5]
N_NEW = 10


def test_kv_cache_greedy_equals_full_recompute_batched_different_lengths():
    model = make_model(seed=0)
    prompts = random_prompts(LENGTHS, model.args.vocab_size, seed=1)
    idx = right_pad(prompts)
    refs = [reference_greedy(model, p, N_NEW) for p in prompts]
    with torch.no_grad():
        cached = as_lists(generate(model, idx.clone(), N_NEW, temperature=0.0, use_cache=True,
                                         prompt_lens=LENGTHS, pad_id=0))
        full = as_lists(generate(model, idx.clone(), N_NEW, temperature=0.0, use_cache=False,
                                       prompt_lens=LENGTHS, pad_id=0))
        alone = [as_lists(generate(model, torch.tensor([p]), N_NEW, temperature=0.0,
                                         use_cache=True))[0] for p in prompts]
    assert full == refs, "use_cache=False batched generation differs from the reference loop"
    assert cached == refs, "use_cache=True batched generation differs from the reference loop"
    assert alone == refs, "B=1 unpadded generation differs from the reference loop"
    assert all(len(r) == N_NEW for r in cached)


def _pick_stop(refs):
    """A (row, k, stop_id) such that refs[row][k] == stop_id first appears at step
    k >= 2 in that row, and at least one other row never emits stop_id."""
    for row, r in enumerate(refs):
        for k in range(2, len(r) - 1):
            stop = r[k]
            if stop in r[:k]:
                continue
            others = [o for j, o in enumerate(refs) if j != row]
            if any(stop not in o for o in others):
                return row, k, stop
    return None


def _truncate(r, stop):
    return r[: r.index(stop) + 1] if stop in r else r


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_token_ends_row_early(use_cache):
    model = make_model(seed=0)
    prompts = random_prompts(LENGTHS, model.args.vocab_size, seed=1)
    idx = right_pad(prompts)
    refs = [reference_greedy(model, p, N_NEW) for p in prompts]
    picked = _pick_stop(refs)
    assert picked is not None, f"test setup: no usable stop id in {refs}"
    row, k, stop = picked
    expected = [_truncate(r, stop) for r in refs]
    assert len(expected[row]) == k + 1
    assert any(len(e) == N_NEW for e in expected)
    with torch.no_grad():
        out = as_lists(generate(model, idx, N_NEW, temperature=0.0, stop_ids=[stop],
                                      use_cache=use_cache, prompt_lens=LENGTHS, pad_id=0))
    assert out == expected
    assert out[row][-1] == stop and len(out[row]) == k + 1


def test_stream_yields_same_tokens_as_generate():
    model = make_model(seed=2)
    (prompt,) = random_prompts([6], model.args.vocab_size, seed=3)
    n = 12
    ref = reference_greedy(model, prompt, n)
    with torch.no_grad():
        gen = as_lists(generate(model, torch.tensor([prompt]), n, temperature=0.0))[0]
        s1 = [int(t) for t in generate_stream(model, torch.tensor(prompt), n, temperature=0.0)]
        s2 = [int(t) for t in generate_stream(model, torch.tensor([prompt]), n, temperature=0.0)]
    assert gen == ref
    assert s1 == ref
    assert s2 == ref
    # and with a stop id: the stream ends right after yielding it
    stop = ref[4]
    exp = _truncate(ref, stop)
    with torch.no_grad():
        s3 = [int(t) for t in generate_stream(model, torch.tensor(prompt), n, temperature=0.0,
                                                    stop_ids=[stop])]
    assert s3 == exp


def test_top_k_1_equals_greedy():
    model = make_model(seed=4)
    prompts = random_prompts(LENGTHS, model.args.vocab_size, seed=5)
    idx = right_pad(prompts)
    refs = [reference_greedy(model, p, N_NEW) for p in prompts]
    torch.manual_seed(123)
    with torch.no_grad():
        out = as_lists(generate(model, idx, N_NEW, temperature=1.0, top_k=1,
                                      prompt_lens=LENGTHS, pad_id=0))
    assert out == refs


def test_top_p_tiny_equals_greedy():
    model = make_model(seed=6)
    prompts = random_prompts(LENGTHS, model.args.vocab_size, seed=7)
    idx = right_pad(prompts)
    refs = [reference_greedy(model, p, N_NEW) for p in prompts]
    torch.manual_seed(123)
    with torch.no_grad():
        out = as_lists(generate(model, idx, N_NEW, temperature=1.0, top_p=1e-6,
                                      prompt_lens=LENGTHS, pad_id=0))
    assert out == refs


@pytest.mark.parametrize("use_cache", [True, False])
def test_repetition_penalty_changes_distribution_as_defined(use_cache):
    # Small vocab (so prompt/generated tokens are often the argmax) and an
    # untied output head with a shared direction added to every row: at some
    # positions ALL logits are negative, which is where the "logit < 0 ->
    # logit * penalty" branch decides the argmax. Setup chosen (seeds, V=32,
    # penalty 1.5) so that each wrong variant checked below gives a different
    # greedy output, i.e. the test is not vacuous.
    V = 32
    model = make_model(seed=8, vocab_size=V, tie_embeddings=False)
    g = torch.Generator().manual_seed(15)
    u = torch.randn(model.args.dim, generator=g)
    with torch.no_grad():
        model.output.weight += 2.0 * u / u.norm()
    prompts = random_prompts(LENGTHS, V, seed=9)
    assert not any(0 in p for p in prompts)  # so penalising the pad id 0 would be a visible bug
    idx = right_pad(prompts, pad_id=0)
    penalty = 1.5
    n = 12
    refs = [reference_greedy(model, p, n, repetition_penalty=penalty) for p in prompts]
    for wrong in (None, "generated_only", "pad_counted", "always_divide"):
        pen = 1.0 if wrong is None else penalty
        alt = [reference_greedy(model, p, n, repetition_penalty=pen, _variant=wrong) for p in prompts]
        assert alt != refs, f"test setup: variant {wrong} indistinguishable from the CTRL rule"
    with torch.no_grad():
        out = as_lists(generate(model, idx, n, temperature=0.0, repetition_penalty=penalty,
                                      use_cache=use_cache, prompt_lens=LENGTHS, pad_id=0))
    assert out == refs


def test_tiny_model_overfits_fixed_batch():
    torch.manual_seed(0)
    V, T, B = 64, 32, 4
    args = make_args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=T)
    model = Transformer(args)
    model.train()
    data = torch.randint(0, V, (B, T + 1))
    x, y = data[:, :-1], data[:, 1:]
    opt = configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # With N(0, 0.02) init the first loss is ~ln(64) = 4.16 (near-uniform prediction).
    assert abs(losses[0] - math.log(V)) < 0.3, losses[0]
    # Bound 0.1: the same setup run with HF LlamaForCausalLM (same dims, same
    # init, AdamW lr 3e-3, betas (0.9, 0.95), wd 0.1 on matmuls) reaches
    # ~0.05 at step 50 and ~0.002 at step 150 over 3 seeds, so 0.1 leaves a ~50x
    # margin while still requiring real memorisation of 128 random next tokens
    # (chance level is 4.16).
    assert losses[-1] < 0.1, f"loss after 150 steps {losses[-1]:.4f} (first {losses[0]:.3f})"
