"""Sampling parameters at their boundary values, and LoRA on a tied output layer.

Every sampling parameter at a boundary either means a whole kind of decoding (greedy, or the filter off) or
is rejected with a ValueError naming the parameter and the value. "Greedy" is checked against a plain argmax
decode written here (full recompute on the unpadded prompt), "off" against the same call without the
parameter and with an identically seeded generator. generate runs on a batch of right-padded prompts of
different lengths, generate_stream on one prompt.
"""
import copy
import dataclasses
import math
import re

import pytest
import torch

from babyllama.generate import generate, generate_stream, sample_next
from babyllama.hf import hf_config_dict
from babyllama.lora import apply_lora, lora_parameters, merge_lora
from model import ModelArgs, Transformer

V = 64
LENGTHS = [3, 7, 5]
N_NEW = 8


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest.py)


@pytest.fixture(scope="module")
def model():
    """dim 32, 2 layers, vocab 64, weights N(0, 0.1) (norms around 1) rather than the 0.02 init, so the
    logits are spread and argmax is never decided by float round-off between the cached and full paths."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16,
                              max_seq_len=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else 0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in LENGTHS]


def right_pad(prompts):
    idx = torch.zeros((len(prompts), max(map(len, prompts))), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = torch.tensor(p)
    return idx


@torch.no_grad()
def argmax_decode(model, prompt, n):
    """The reference greedy decode: the whole sequence through forward at every step, argmax of the last logits."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0][0, -1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > 1e-4, "test setup: a near-tie would make greedy depend on round-off"
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return [argmax_decode(model, p, N_NEW) for p in prompts]


def gen(model, prompts, seed=None, n=N_NEW, **kw):
    """generate n tokens for the right-padded batch, with a generator seeded `seed` (None: the global RNG)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(model, right_pad(prompts), n, prompt_lens=LENGTHS, generator=g, **kw)


def stream(model, prompt, seed=None, n=N_NEW, **kw):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return list(generate_stream(model, torch.tensor(prompt), n, generator=g, **kw))


def assert_greedy(model, prompts, greedy, **kw):
    torch.manual_seed(123)
    assert gen(model, prompts, **kw) == greedy
    assert stream(model, prompts[1], **kw) == greedy[1]


def assert_same_as(model, prompts, kw, off_kw):
    """kw decodes exactly as off_kw with identically seeded generators (and is really sampling)."""
    sampled = gen(model, prompts, seed=7, **off_kw)
    assert gen(model, prompts, seed=7, **kw) == sampled
    assert stream(model, prompts[1], seed=7, **kw) == stream(model, prompts[1], seed=7, **off_kw)
    assert sampled != gen(model, prompts, temperature=0.0), "test setup: sampling gave the greedy tokens"


def assert_rejected(model, prompts, name, value, **kw):
    """generate, generate_stream (at the call, before any iteration) and sample_next all raise a ValueError
    whose message names the parameter and the value."""
    args = dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0)
    args.update(kw)
    args[name] = value
    n = args.pop("max_new_tokens", N_NEW)
    named = re.escape(f"{name}={value!r}")
    with pytest.raises(ValueError, match=named):
        gen(model, prompts, n=n, **args)
    with pytest.raises(ValueError, match=named):
        generate_stream(model, torch.tensor(prompts[0]), n, **args)
    if name != "max_new_tokens":
        with pytest.raises(ValueError, match=named):
            sample_next(torch.zeros(2, V), **args)


def test_top_p_zero_is_greedy_one_is_off_and_values_outside_0_1_raise(model, prompts, greedy):
    assert_greedy(model, prompts, greedy, temperature=0.8, top_p=0.0)
    assert_same_as(model, prompts, dict(temperature=1.0, top_p=1.0), dict(temperature=1.0))
    for bad in (-0.1, 1.5, math.nan):
        assert_rejected(model, prompts, "top_p", bad)


def test_top_k_one_is_greedy_zero_or_vocab_size_and_more_is_off_and_negative_raises(model, prompts, greedy):
    assert_greedy(model, prompts, greedy, temperature=1.3, top_k=1)
    for off in (0, V, 10 * V):
        assert_same_as(model, prompts, dict(temperature=1.0, top_k=off), dict(temperature=1.0))
    for bad in (-1, 2.5):
        assert_rejected(model, prompts, "top_k", bad)


def test_temperature_zero_is_greedy_whatever_the_filters_and_negative_raises(model, prompts, greedy):
    assert_greedy(model, prompts, greedy, temperature=0.0, top_k=5, top_p=0.5)
    for bad in (-0.5, -1e-9, math.inf, math.nan):
        assert_rejected(model, prompts, "temperature", bad)


def test_repetition_penalty_one_is_off_and_zero_or_negative_raises(model, prompts, greedy):
    assert_greedy(model, prompts, greedy, temperature=0.0, repetition_penalty=1.0)
    assert_same_as(model, prompts, dict(temperature=1.0, repetition_penalty=1.0), dict(temperature=1.0))
    for bad in (0.0, -1.2, math.nan):
        assert_rejected(model, prompts, "repetition_penalty", bad)
        assert_rejected(model, prompts, "repetition_penalty", bad, temperature=0.0)  # greedy checks it too


def test_max_new_tokens_zero_gives_no_tokens_and_negative_raises(model, prompts):
    idx = right_pad(prompts)
    assert generate(model, idx, 0, temperature=1.0, prompt_lens=LENGTHS) == [[], [], []]
    assert generate(model, idx, 0, prompt_lens=LENGTHS, stop_ids=[1, 2]) == [[], [], []]
    assert list(generate_stream(model, torch.tensor(prompts[0]), 0, temperature=1.0)) == []
    for bad in (-1, 1.5):
        assert_rejected(model, prompts, "max_new_tokens", bad)
    with pytest.raises(ValueError, match="max_new_tokens=32 must be < max_seq_len=32"):
        generate(model, idx, 32, prompt_lens=LENGTHS)


TIED = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=16, max_seq_len=16,
                 tie_embeddings=True)


def tokens(seed):
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_lora_on_tied_output_merges_and_reloads_to_the_same_logits():
    torch.manual_seed(0)
    base = Transformer(TIED).eval()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="output,wq")
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = tokens(1)
    for _ in range(5):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    x = tokens(2)
    with torch.no_grad():
        adapted = model(x)[0]
        assert (adapted - base(x)[0]).abs().max().item() > 1e-3  # the adapters did something
        merge_lora(model)
        assert (model(x)[0] - adapted).abs().max().item() <= 1e-5
        # the merged output is no longer the embedding: model.args says so, the shared TIED is untouched
        assert model.args.tie_embeddings is False and TIED.tie_embeddings is True
        assert model.output.weight is not model.tok_embeddings.weight
        assert torch.equal(model.tok_embeddings.weight, base.tok_embeddings.weight)
        assert hf_config_dict(model.args)["tie_word_embeddings"] is False
        fresh = Transformer(ModelArgs(**dataclasses.asdict(model.args))).eval()
        fresh.load_state_dict(model.state_dict())
        assert (fresh(x)[0] - adapted).abs().max().item() <= 1e-5


def test_untrained_lora_on_tied_output_merges_back_to_a_tied_model():
    torch.manual_seed(0)
    base = Transformer(TIED).eval()
    model = merge_lora(apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="output"))
    assert model.output.weight is model.tok_embeddings.weight and model.args.tie_embeddings is True
    x = tokens(3)
    with torch.no_grad():
        assert torch.equal(model(x)[0], base(x)[0])
