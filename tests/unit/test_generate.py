"""babyllama/generate.py against a plain reference loop written here: run the model on the whole (unpadded)
sequence, take the last position's logits, optionally apply the CTRL / Hugging Face repetition penalty, take
argmax. The KV cache, right-padded batches of different lengths, stop ids and the stream give its tokens; every
sampling parameter at a boundary either means a whole kind of decoding (greedy, or the filter off: the same tokens
as without it from an identically seeded generator) or is rejected with a ValueError naming parameter and value."""
import math
import re

from conftest import spread_weights_, tiny_model
import pytest
import torch

from babyllama.generate import generate, generate_stream, sample_next

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest.py)


def make_model(seed=0, **overrides):
    """tiny_model with spread weights (so greedy argmax is never decided by float round-off), in eval mode."""
    return spread_weights_(tiny_model(seed, **overrides), seed + 1000).eval()


def random_prompts(lengths, vocab, seed, low=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


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
                     _variant=None, min_margin=None):
    """Full recomputation, one unpadded prompt, greedy. Repetition penalty as in
    CTRL / HF RepetitionPenaltyLogitsProcessor: for every token id present in
    prompt + generated so far, logit > 0 -> logit / penalty, logit < 0 -> logit * penalty.
    _variant selects a deliberately WRONG rule, only used to show that the
    repetition-penalty test can tell the correct rule from plausible mistakes.
    min_margin: assert the top two logits of every step are further apart (no near-tie for round-off to decide)."""
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq], dtype=torch.long))
        last = logits[0, -1].double().clone()
        if min_margin is not None:
            top2 = last.topk(2).values
            assert top2[0] - top2[1] > min_margin, "test setup: a near-tie would make greedy depend on round-off"
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


@pytest.mark.parametrize("seed, kw", [(4, dict(top_k=1)), (6, dict(top_p=1e-6))], ids=["top_k_1", "top_p_tiny"])
def test_top_k_1_and_a_tiny_top_p_equal_greedy(seed, kw):
    model = make_model(seed=seed)
    prompts = random_prompts(LENGTHS, model.args.vocab_size, seed=seed + 1)
    idx = right_pad(prompts)
    refs = [reference_greedy(model, p, N_NEW) for p in prompts]
    torch.manual_seed(123)
    with torch.no_grad():
        out = as_lists(generate(model, idx, N_NEW, temperature=1.0, prompt_lens=LENGTHS, pad_id=0, **kw))
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


# ---- sampling parameters at their boundary values ---------------------------------------------------------------
# "greedy" is checked against reference_greedy, "off" against the same call without the parameter and with an
# identically seeded generator; generate runs on the right-padded LENGTHS prompts, generate_stream on one prompt

V = 64


@pytest.fixture(scope="module")
def model():
    """dim 32, vocab 64, spread weights."""
    return spread_weights_(tiny_model(0, dim=32, vocab_size=V, max_seq_len=32), 1).eval()


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, V, seed=2, low=1)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return [reference_greedy(model, p, N_NEW, min_margin=1e-4) for p in prompts]


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
