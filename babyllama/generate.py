"""Generation: batched prompts of different lengths, top-k/top-p/repetition penalty, stop tokens and streaming, over
model.py's KV-cache forward (for eval.py, serve.py and the RL rollouts; model.generate is the plain one). Parameters are
checked once per call, not per token; ValueError names the parameter and its value."""
import math
import numbers

import torch
import torch.nn as nn


def compile_decode(model):
    """torch.compile the one-token decode step (dynamic shapes: one graph for every cache length). On CPU this removes
    most of the per-operator overhead of small-model generation; the first generate() call pays the compilation."""
    model._decode_step = torch.compile(model._forward_positions, dynamic=True)
    return model


def stacked_weights(model):
    """Per layer ([wq; wk; wv], [w1; w3]): fewer, larger matrix-vector products. (None, None) for a layer whose
    projections are not plain nn.Linear (int8, LoRA)."""
    def stack(*mods):
        return torch.cat([m.weight for m in mods]) if all(type(m) is nn.Linear for m in mods) else None
    return [(stack(l.attention.wq, l.attention.wk, l.attention.wv), stack(l.feed_forward.w1, l.feed_forward.w3))
            for l in model.layers]


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
             stop_ids=None, use_cache=True, prompt_lens=None, pad_id=0, generator=None):
    """Generate for a batch of right-padded prompts idx (B, T) int64 with true lengths prompt_lens (B,) (None = all T;
    pad_id is not read). Returns B lists of new token ids; a row ends after a token in stop_ids (kept). max_new_tokens:
    0 returns B empty lists; must be < max_seq_len (prompts are cropped from the left to fit). The sampling parameters
    and their boundaries: see sample_next. ValueError naming the parameter and its value for max_new_tokens < 0 or >=
    max_seq_len and the invalid sampling values check_sampling_args lists."""
    check_generation_args(max_new_tokens, model.args.max_seq_len, temperature, top_k, top_p, repetition_penalty)
    out = [[] for _ in range(idx.shape[0])]
    for step_tokens, alive in _generate_steps(model, idx, max_new_tokens, temperature, top_k, top_p,
                                              repetition_penalty, stop_ids, use_cache, prompt_lens, generator):
        for b in range(len(out)):
            if alive[b]:
                out[b].append(step_tokens[b])
    return out


def generate_stream(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, stop_ids=None, use_cache=True, generator=None):
    """Generate for one prompt (T,) or (1, T) int64: an iterator yielding each new token id (int) as soon as it is
    chosen, ending after a token in stop_ids (yielded). Parameters as in generate. An invalid one raises ValueError
    here, at the call, not at the first next()."""
    check_generation_args(max_new_tokens, model.args.max_seq_len, temperature, top_k, top_p,
                          repetition_penalty)
    return _stream(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
                   use_cache, generator)


@torch.inference_mode()
def _stream(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids, use_cache,
            generator):
    """generate_stream's generator (a separate function so that generate_stream validates eagerly)."""
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    for step_tokens, alive in _generate_steps(model, idx, max_new_tokens, temperature, top_k, top_p,
                                              repetition_penalty, stop_ids, use_cache, None, generator):
        yield step_tokens[0]


def _generate_steps(model, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
                    use_cache, prompt_lens, generator):
    """Yields (tokens of this step as a list, which rows were still running) once per step. Prompts are re-laid out
    left-padded so every row's next token sits in one column: row b has `pad[b]` leading pad slots, positions from 0 at
    its first real token, and the mask hides the pad slots (each slot sees itself, so no softmax row is empty)."""
    B, T = idx.shape
    device = idx.device
    lens = torch.full((B,), T, dtype=torch.long) if prompt_lens is None else torch.as_tensor(prompt_lens)
    max_len = model.args.max_seq_len  # (the arguments were checked by the caller, once)
    if max_new_tokens == 0:  # nothing to generate: skip the prompt re-layout and the caches
        return
    max_new_tokens = int(max_new_tokens)
    keep = max_len - max_new_tokens  # crop prompts from the left so prompt + new tokens fit the context
    tokens = torch.zeros((B, min(int(lens.max()), keep)), dtype=torch.long, device=device)
    lens = lens.clamp(max=tokens.shape[1])
    Tp = tokens.shape[1]
    pad = (Tp - lens).to(device)
    for b in range(B):
        n = int(lens[b])
        row_len = int(prompt_lens[b]) if prompt_lens is not None else T
        tokens[b, Tp - n:] = idx[b, row_len - n:row_len]
    total = Tp + max_new_tokens
    cols = torch.arange(total, device=device)
    key_valid = cols[None, :] >= pad[:, None]  # (B, total)
    all_pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, total)
    # (B, 1, total, total): causal, real keys only, plus the diagonal
    full_mask = (cols[:, None] >= cols[None, :])[None] & key_valid[:, None, :]
    full_mask = (full_mask | torch.eye(total, dtype=torch.bool, device=device)[None]).unsqueeze(1)
    no_pad = bool((pad == 0).all())

    seen = None
    if repetition_penalty != 1.0:
        counts = torch.zeros((B, model.args.vocab_size), dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, tokens, key_valid[:, :Tp].long()) > 0  # pad slots add 0
    stop = torch.tensor(sorted(set(stop_ids or [])), dtype=torch.long, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)

    caches = None
    if use_cache:
        n_kv = model.layers[0].attention.n_kv_heads
        hd = model.args.dim // model.args.n_heads
        dtype = model.tok_embeddings.weight.dtype
        caches = [(torch.empty(B, n_kv, total, hd, device=device, dtype=dtype),
                   torch.empty(B, n_kv, total, hd, device=device, dtype=dtype)) for _ in model.layers]
    fused = stacked_weights(model) if use_cache else None
    seq = tokens
    for step in range(max_new_tokens):
        cur = Tp + step  # columns filled so far
        # step 0 runs the whole prompt (the prefill); later steps only the newest token, reading the cache
        start = 0 if (step == 0 or not use_cache) else cur - 1
        # unpadded prompts need no mask: causal prefill, and a decode step may see every key
        mask = None if no_pad else full_mask[:, :, start:cur, :cur]
        forward = model._decode_step if (step > 0 and model._decode_step is not None) else model._forward_positions
        logits = forward(seq[:, start:cur], all_pos[:, start:cur], mask, caches, start, fused)
        logits = logits[:, -1, :].float()
        next_tok = sample_checked_once(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
        yield next_tok.tolist(), alive.tolist()
        if seen is not None:
            seen[torch.arange(B, device=device), next_tok] = True
        if stop.numel():
            alive &= ~torch.isin(next_tok, stop)
            if not bool(alive.any()):
                return
        seq = torch.cat((seq, next_tok[:, None]), dim=1)


def _is_count(x):
    """True for an integer-valued finite number >= 0 (3 or 3.0; not True, nan, inf or "3")."""
    return (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            and int(x) == x)


def right_pad(rows, device=None):
    """B lists of ids -> ((B, L) int64 padded with zeros on the right, the lengths): the layout of generate() and
    scoring."""
    lens = [len(r) for r in rows]
    x = torch.zeros((len(rows), max(lens)), dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return (x if device is None else x.to(device)), lens


def check_sampling_args(temperature, top_k, top_p, repetition_penalty):
    """Raise ValueError, naming the parameter and its value, unless temperature is a finite number >= 0, top_k None or
    an integer >= 0, top_p None or in [0, 1], repetition_penalty a finite number > 0. Boundaries: sample_next."""
    # every test is written to fail for nan too (comparisons with nan are False)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and not _is_count(top_k):
        raise ValueError(f"top_k={top_k!r} must be None or an integer >= 0 (None or 0 = off, 1 = greedy)")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be None or in [0, 1] (0 = greedy, None or 1 = off)")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a finite number > 0 (1 = off)")


def check_generation_args(max_new_tokens, max_seq_len, temperature, top_k, top_p, repetition_penalty):
    """check_sampling_args, and max_new_tokens an integer in [0, max_seq_len); else ValueError naming it."""
    if not _is_count(max_new_tokens):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0 (0 = no new tokens)")
    if max_new_tokens >= max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be < max_seq_len={max_seq_len}")
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)


def sample_next(logits, temperature, top_k, top_p, repetition_penalty=1.0, seen=None, generator=None):
    """Choose the next token per row: logits (B, V) float -> token ids (B,) int64. Order as in HF: repetition penalty
    (CTRL's, on the tokens where seen (B, V) bool is True), temperature, top-k, top-p, then one draw per row with
    generator (None = the global RNG). Boundaries: temperature 0 = greedy; top_k None, 0 or >= V = off, 1 = greedy;
    top_p None or 1 = off, 0 = greedy; repetition_penalty 1 = off. Greedy is the argmax of the (penalised) logits and
    draws nothing from the generator. ValueError as check_sampling_args."""
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    return sample_checked_once(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)


def sample_checked_once(logits, temperature, top_k, top_p, repetition_penalty, seen, generator):
    """sample_next without the checks, for loops that checked the settings once, before their first step (generate,
    the serving scheduler)."""
    if seen is not None and repetition_penalty != 1.0:
        # CTRL's penalty: make already-seen tokens less likely whatever the sign of their logit
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    # every limit that keeps only the top token is argmax itself: exact, whatever ties or temperature
    if temperature == 0.0 or top_k == 1 or top_p == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):  # top_k >= V keeps every token: nothing to do
        kth = torch.topk(logits, int(top_k), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already cover top_p; the most likely token always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
