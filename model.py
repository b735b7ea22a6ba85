"""
The Llama 2 model, written out in one file: RMSNorm, rotary embeddings (RoPE), grouped-query attention,
SwiGLU feed-forward, tied input/output embeddings. Plus generation with a KV cache, optimizer groups and
an MFU estimate. Depends on torch only.

RoPE uses the "rotate-half" layout of Hugging Face's LlamaForCausalLM (the first half of each head's
dimensions pairs with the second half), so exporting to HF is a renaming of tensors, with no permutation
of wq/wk. tests/test_model_hf_parity.py proves the logits equal.
"""
import inspect
import math
import numbers
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelArgs:
    """Hyperparameters of the Llama 2 network (Touvron et al. 2023).

    dim: width D of the embeddings and the residual stream. n_layers: number of TransformerBlocks.
    n_heads: query heads H; head_dim = dim // n_heads (Attention asserts dim % n_heads == 0).
    n_kv_heads: key/value heads of grouped-query attention; None = n_heads (plain multi-head attention),
        1 = multi-query attention; must divide n_heads (asserted).
    vocab_size: V, the rows of the embedding and output matrices.
    multiple_of, ffn_dim_multiplier: the SwiGLU hidden width is int(8 * dim / 3), scaled by ffn_dim_multiplier
        when it is not None, rounded up to a multiple of multiple_of (see ffn_hidden_dim).
    norm_eps: epsilon added to the mean square in every RMSNorm.
    max_seq_len: longest sequence T the model takes (forward asserts T <= max_seq_len) and the length of the
        RoPE tables; generation keeps prompt + new tokens within it.
    dropout: probability used on the embedding output (in forward), the attention weights and the output of
        every attention and feed-forward branch; active in train mode only.
    tie_embeddings: the output layer shares tok_embeddings' (V, D) weight.
    rope_theta: RoPE base; head dims i and i + head_dim/2 rotate by pos * rope_theta ** (-2i / head_dim) radians.
    hidden_dim: the SwiGLU hidden width itself, overriding multiple_of and ffn_dim_multiplier (None = computed;
        set when a model comes from elsewhere, e.g. export.py --import_from, with a width the rule cannot give).
    """
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None = n_heads (plain multi-head attention)
    vocab_size: int = 8000
    multiple_of: int = 32  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    hidden_dim: Optional[int] = None


def ffn_hidden_dim(args):
    """Hidden width (int) of FeedForward for args (ModelArgs): int(8 * dim / 3), scaled by ffn_dim_multiplier
    if set, rounded up to a multiple of multiple_of (768 for the defaults); LlamaConfig's intermediate_size."""
    # Llama 2: 2/3 of 4*dim (so SwiGLU's three matrices cost what a 4*dim GELU MLP's two do), optionally
    # scaled, rounded up to multiple_of for efficient kernels.
    if args.hidden_dim is not None:
        return args.hidden_dim
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), as in Llama 2: no mean subtraction, no bias, a
    learned per-channel scale `weight` (dim,) initialised to ones; eps is added to the mean square."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x (..., D) -> (..., D): x / sqrt(mean(x^2 over D) + eps) * weight. The result has the promoted dtype
        of x and weight (fp32 for bf16 x under autocast with fp32 weights)."""
        # normalise in fp32 even under autocast (the mean of squares loses precision in bf16), then scale;
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def rope_cos_sin(head_dim, max_len, theta):
    """cos and sin tables (max_len, head_dim) in rotate-half layout: frequency i sits at i and i+head_dim/2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotary position embedding (RoPE, Su et al. 2021) in rotate-half layout. x (B, H, T, hd) with hd even;
    cos, sin from rope_cos_sin indexed by position, (T, hd) or (B, 1, T, hd). Returns x's shape, in the dtype
    promoted with cos/sin's (the fp32 tables turn bf16 x into fp32)."""
    # x: (B, H, T, hd); cos/sin broadcast to it. Rotating the pair (x_i, x_{i+hd/2}) by angle pos*freq_i.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal self-attention with RoPE on queries and keys and grouped-query attention (GQA, Ainslie et al.
    2023): n_kv_heads key/value heads, each shared by n_heads // n_kv_heads consecutive query heads
    (n_kv_heads == n_heads is plain multi-head attention). Bias-free wq, wk, wv, wo, as in Llama 2.
    Raises AssertionError unless dim % n_heads == 0 and n_heads % n_kv_heads == 0."""

    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        assert args.dim % args.n_heads == 0 and args.n_heads % self.n_kv_heads == 0
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0, wqkv=None):
        """x (B, T, D) -> (B, T, D). cos, sin: RoPE tables of the T positions, (T, hd) or (B, 1, T, hd).
        mask: None = causal (the queries must then start at position 0, or T == 1), else a boolean mask
        broadcastable to (B, H, T, S), True = may attend, S the keys (T, or cache_pos + T with a cache).
        cache: (k, v) buffers (B, n_kv_heads, L, hd), written in place at columns [cache_pos, cache_pos + T);
        the queries then attend to columns [0, cache_pos + T). wqkv: optional stacked [wq; wk; wv] weight
        ((n_heads + 2 * n_kv_heads) * hd, D), used instead of the three projections.
        Raises AssertionError when mask is None, T > 1 and cache_pos != 0."""
        B, T, _ = x.shape
        if wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:  # generation passes [wq; wk; wv] stacked: one matrix-vector product reads weights faster
            kv_dim = self.n_kv_heads * self.head_dim
            q, k, v = F.linear(x, wqkv).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # without a mask, several queries are only causal if they start at position 0 (SDPA's is_causal
        # aligns the causal diagonal top-left)
        assert mask is not None or T == 1 or cache_pos == 0
        if cache is not None:
            # preallocated (B, n_kv_heads, L, hd) buffers: write this step's keys/values, attend to all so far
            k_cache, v_cache = cache
            k_cache[:, :, cache_pos:cache_pos + T] = k
            v_cache[:, :, cache_pos:cache_pos + T] = v
            k, v = k_cache[:, :, :cache_pos + T], v_cache[:, :, :cache_pos + T]
        if self.n_kv_heads != self.n_heads:
            # query head h reads kv head h // n_rep (the grouping HF's repeat_kv uses)
            n_rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        dtype = q.dtype
        amp_off = nullcontext()
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # on CPU the bf16 flash-attention backward is ~3x slower than fp32's (measured, torch 2.13):
            # attend in fp32, the matmuls around it stay in bf16
            q, k, v = q.float(), k.float(), v.float()
            amp_off = torch.autocast("cpu", enabled=False)
        with amp_off:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1).to(dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020), as in Llama 2: w2(silu(w1 x) * w3 x), bias-free, hidden width
    ffn_hidden_dim(args), dropout on the output."""

    def __init__(self, args):
        super().__init__()
        hidden = ffn_hidden_dim(args)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down (residual output projection)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x, w13=None):
        """x (..., D) -> (..., D). w13: optional stacked [w1; w3] weight (2 * hidden, D), used instead of w1, w3."""
        if w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:  # [w1; w3] stacked, as wqkv above
            gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


class TransformerBlock(nn.Module):
    """One pre-norm Llama 2 block: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)).
    checkpointing = True (activation checkpointing, Chen et al. 2016): in training, keep only the block's input
    and recompute the rest in the backward pass: the activations of a layer shrink to one (B, T, D) tensor for
    about a third more compute; the gradients are the same (dropout masks are replayed from the saved RNG
    state). Set per block (train_utils.parallelize) so FSDP gathers the weights once for the recomputation."""
    checkpointing = False

    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0, fused=(None, None)):
        """x (B, T, D) -> (B, T, D). cos, sin, mask, cache, cache_pos as in Attention.forward (and its
        AssertionError); fused: the stacked weights (wqkv, w13) for attention and feed-forward, or (None, None)."""
        if self.checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, None, 0, fused,
                                                     use_reentrant=False)
        return self._forward(x, cos, sin, mask, cache, cache_pos, fused)

    def _forward(self, x, cos, sin, mask, cache, cache_pos, fused):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_pos, fused[0])
        return h + self.feed_forward(self.ffn_norm(h), fused[1])


class Transformer(nn.Module):
    """The Llama 2 decoder-only language model: token embedding (V, D), n_layers TransformerBlocks, a final
    RMSNorm and a bias-free output projection to V logits, tied to the embedding when args.tie_embeddings.
    The RoPE cos/sin tables (max_seq_len, head_dim) are non-persistent buffers (not in the state_dict).
    Linear and embedding weights start N(0, 0.02), the residual projections wo and w2 N(0, 0.02 / sqrt(2 * n_layers)).
    Raises AssertionError for args that Attention rejects."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_cos_sin(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._decode_step = None  # set by compile_decode()
        self.apply(self._init_weights)
        # GPT-2 / Llama practice: the projections that write into the residual stream are scaled down by
        # sqrt(2 * n_layers) (two per layer), so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters, counting a tied embedding/output matrix once (parameters() already dedups it)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    # ---- forward -------------------------------------------------------------------------------------

    def forward(self, tokens, targets=None, return_logits=True):
        """tokens (B, T) -> logits (B, T, V) and the mean cross-entropy against targets (-1 = ignored).
        With targets and return_logits=False (what training uses) the output layer and the loss run fused
        in chunks of rows, never holding the (B*T, V) logits: faster on CPU, far less memory on GPU."""
        T = tokens.shape[1]
        assert T <= self.args.max_seq_len, f"sequence length {T} > max_seq_len {self.args.max_seq_len}"
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(h.view(-1, h.size(-1)), self.output.weight, targets.reshape(-1))
        logits = self.output(h)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def _forward_positions(self, tokens, pos, mask, caches=None, cache_pos=0, fused=None, head=True):
        """Inference forward with explicit per-row positions (B, T) and a boolean attention mask
        (B, 1, T, S), optionally reading/writing KV caches. Returns logits (B, T, V), or with head=False the
        final normalised hidden states (B, T, D), for callers that need the logits of a few positions only
        (self.output of those rows)."""
        cos = self.rope_cos[pos].unsqueeze(1)  # (B, 1, T, hd)
        sin = self.rope_sin[pos].unsqueeze(1)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if caches is None else caches[i], cache_pos,
                      (None, None) if fused is None else fused[i])
        h = self.norm(h)
        return self.output(h) if head else h

    def compile_decode(self):
        """torch.compile the one-token decode step (dynamic shapes: one graph for every cache length).
        On CPU this removes most of the per-operator overhead that dominates small-model generation;
        the first generate() call pays the compilation."""
        self._decode_step = torch.compile(self._forward_positions, dynamic=True)
        return self

    def _stacked_weights(self):
        """Per layer ([wq; wk; wv], [w1; w3]) for generation: fewer, larger matrix-vector products. (None, None)
        for a layer whose projections are not plain nn.Linear (int8, LoRA): they run one by one."""
        def stack(*mods):
            return torch.cat([m.weight for m in mods]) if all(type(m) is nn.Linear for m in mods) else None
        return [(stack(l.attention.wq, l.attention.wk, l.attention.wv), stack(l.feed_forward.w1, l.feed_forward.w3))
                for l in self.layers]

    # ---- generation ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 stop_ids=None, use_cache=True, prompt_lens=None, pad_id=0, generator=None):
        """Generate for a batch of right-padded prompts idx (B, T) int64 with true lengths prompt_lens (B,)
        (None = every row has length T; pad_id is not read: prompt_lens says where each row ends).
        Returns B lists of new token ids; a row ends after it emits a token in stop_ids (kept in the list).

        max_new_tokens: 0 returns B empty lists; must be < max_seq_len (prompts are cropped from the left so
        prompt + new tokens fit). The sampling parameters, at their boundaries (see sample_next):
        temperature 0 = greedy; top_k None, 0 or >= vocab_size = off, 1 = greedy; top_p None or 1 = off,
        0 = greedy (only the top token is kept); repetition_penalty 1 = off. Greedy means the argmax of the
        (penalised) logits, the same tokens whatever the temperature and generator.
        Raises ValueError naming the parameter and its value for max_new_tokens < 0 or >= max_seq_len,
        temperature < 0, top_k < 0, top_p outside [0, 1], repetition_penalty <= 0 (and non-finite or non-integer
        values where a finite number or an integer is expected)."""
        out = [[] for _ in range(idx.shape[0])]
        for step_tokens, alive in self._generate_steps(idx, max_new_tokens, temperature, top_k, top_p,
                                                       repetition_penalty, stop_ids, use_cache, prompt_lens,
                                                       generator):
            for b in range(len(out)):
                if alive[b]:
                    out[b].append(step_tokens[b])
        return out

    def generate_stream(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, stop_ids=None, use_cache=True, generator=None):
        """Generate for one prompt (T,) or (1, T) int64, returning an iterator that yields each new token id
        (int) as soon as it is chosen and stops after a token in stop_ids (yielded). Parameters and their
        boundaries as in generate: max_new_tokens 0 yields nothing. The ValueError for an invalid parameter
        is raised here, at the call, not at the first next()."""
        check_generation_args(max_new_tokens, self.args.max_seq_len, temperature, top_k, top_p,
                              repetition_penalty)
        return self._stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
                            use_cache, generator)

    def generate_batch_stream(self, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                              repetition_penalty=1.0, stop_ids=None, prompt_lens=None, generator=None):
        """generate() step by step, for a server that streams every row of a batch: an iterator that yields,
        once per step, (the B new token ids, which rows were still running at this step) as lists; a row stops
        running after it emits a token in stop_ids (later tokens of that row are to be ignored), and the
        iterator ends when every row has stopped or after max_new_tokens steps. Arguments as in generate; the
        ValueError for an invalid one is raised at the call."""
        check_generation_args(max_new_tokens, self.args.max_seq_len, temperature, top_k, top_p,
                              repetition_penalty)
        return self._batch_stream(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
                                  prompt_lens, generator)

    @torch.inference_mode()
    def _batch_stream(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
                      prompt_lens, generator):
        yield from self._generate_steps(idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        stop_ids, True, prompt_lens, generator)

    @torch.inference_mode()
    def _stream(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids, use_cache,
                generator):
        """generate_stream's generator (a separate function so that generate_stream validates eagerly)."""
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        for step_tokens, alive in self._generate_steps(idx, max_new_tokens, temperature, top_k, top_p,
                                                       repetition_penalty, stop_ids, use_cache, None, generator):
            yield step_tokens[0]

    def _generate_steps(self, idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
                        use_cache, prompt_lens, generator):
        """Yields (tokens of this step as a list, which rows were still running) once per step.

        Prompts of different lengths are re-laid out left-padded, so every row's next token sits in the same
        column: row b has `pad[b]` leading pad slots, its positions count from 0 at its first real token, and
        the mask hides the pad slots (each slot may see itself, so no softmax row is empty)."""
        B, T = idx.shape
        device = idx.device
        lens = torch.full((B,), T, dtype=torch.long) if prompt_lens is None else torch.as_tensor(prompt_lens)
        max_len = self.args.max_seq_len
        check_generation_args(max_new_tokens, max_len, temperature, top_k, top_p, repetition_penalty)
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
            counts = torch.zeros((B, self.args.vocab_size), dtype=torch.long, device=device)
            seen = counts.scatter_add_(1, tokens, key_valid[:, :Tp].long()) > 0  # pad slots add 0
        stop = torch.tensor(sorted(set(stop_ids or [])), dtype=torch.long, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)

        caches = None
        if use_cache:
            n_kv = self.layers[0].attention.n_kv_heads
            hd = self.args.dim // self.args.n_heads
            dtype = self.tok_embeddings.weight.dtype
            caches = [(torch.empty(B, n_kv, total, hd, device=device, dtype=dtype),
                       torch.empty(B, n_kv, total, hd, device=device, dtype=dtype)) for _ in self.layers]
        fused = self._stacked_weights() if use_cache else None
        seq = tokens
        for step in range(max_new_tokens):
            cur = Tp + step  # columns filled so far
            # step 0 runs the whole prompt (the prefill); later steps only the newest token, reading the cache
            start = 0 if (step == 0 or not use_cache) else cur - 1
            # unpadded prompts need no mask: causal prefill, and a decode step may see every key
            mask = None if no_pad else full_mask[:, :, start:cur, :cur]
            forward = self._decode_step if (step > 0 and self._decode_step is not None) else self._forward_positions
            logits = forward(seq[:, start:cur], all_pos[:, start:cur], mask, caches, start, fused)
            logits = logits[:, -1, :].float()
            next_tok = sample_next(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
            yield next_tok.tolist(), alive.tolist()
            if seen is not None:
                seen[torch.arange(B, device=device), next_tok] = True
            if stop.numel():
                alive &= ~torch.isin(next_tok, stop)
                if not bool(alive.any()):
                    return
            seq = torch.cat((seq, next_tok[:, None]), dim=1)

    # ---- training helpers ----------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_momentum=0.95):
        """The optimizer of the parameters that require grad. optimizer='adamw': torch.optim.AdamW in two
        groups: matrices (dim >= 2) get weight_decay; RMSNorm weights and tok_embeddings.weight (with the output
        when tied; an untied output is decayed) get 0. betas: (beta1, beta2); device_type: "cuda", "cpu", ...
        The fused implementation is asked for on cuda and cpu when AdamW has it; if that raises RuntimeError or
        TypeError, plain AdamW.
        optimizer='muon': torch.optim.Muon (Jordan et al. 2024: Nesterov momentum `muon_momentum`, then the
        update orthogonalised by 5 Newton-Schulz steps) for the 2-D matrices inside the blocks (wq, wk, wv, wo,
        w1, w2, w3, and LoRA adapters there), AdamW as above for the embedding, the output layer and the norms,
        as modded-nanogpt and nanochat split them. Muon's step is scaled to AdamW's update size
        (adjust_lr_fn='match_rms_adamw', Liu et al. 2025, "Muon is scalable"), so one learning_rate and one
        schedule serve both. Returns an Optimizers of the two. ValueError for another optimizer name."""
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
        # decay matmul weights only; norms and embeddings (a lookup table, and the tied output) are not decayed
        decay, no_decay, hidden = [], [], []
        for name, p in self.named_parameters():  # a tied weight appears once, as tok_embeddings.weight
            if not p.requires_grad:
                continue
            if optimizer == "muon" and p.dim() == 2 and name.startswith("layers."):
                hidden.append(p)
                continue
            (decay if p.dim() >= 2 and "tok_embeddings" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]] if optimizer == "muon" else groups
        # the fused kernel runs the whole update in one launch per group: on GPUs, and on CPU since torch 2.4
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        try:
            adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        except (RuntimeError, TypeError):
            adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
        if optimizer == "adamw":
            return adamw
        muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, momentum=muon_momentum,
                                adjust_lr_fn="match_rms_adamw")
        return Optimizers([adamw, muon])

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N for the matmuls with
        N the parameters used in matmuls, plus 12*L*dim*T for attention scores and values."""
        a = self.args
        T = a.max_seq_len if seq_len is None else seq_len
        n = self.num_params()
        if not a.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()  # a lookup, not a matmul
        return 6 * n + 12 * a.n_layers * a.dim * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, seq_len=None):
        """Model FLOPs utilisation: achieved FLOP/s over the GPU's dense bf16 peak; None when unknown (CPU)."""
        peak = peak_flops()
        if peak is None:
            return None
        T = self.args.max_seq_len if seq_len is None else seq_len
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak


class Optimizers:
    """Several optimizers stepped as one (Muon for the blocks' matrices, AdamW for the rest): param_groups are
    all of theirs (the LR schedule and gradient clipping see every parameter), step, zero_grad, state_dict and
    load_state_dict go to each in turn. `optimizers` is the list (DCP checkpoints save each)."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        """Raises ValueError when the state is another optimizer's (e.g. an AdamW run resumed with Muon)."""
        if "optimizers" not in state or len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not this optimizer's (adamw vs muon?): resume "
                             "with the optimizer the run started with")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


# ---- int8 weight-only quantisation (inference) ---------------------------------------------------------------

class Int8Linear(nn.Module):
    """A bias-free linear layer for inference whose weight (out, in) is kept as int8 with one scale per output
    row: W ~ q * scale[:, None], scale = max|W_row| / 127, q = round(W / scale), so each weight is off by at most
    scale / 2 and y_j = x . W_j is off by at most (scale_j / 2) * sum_i |x_i|. Weights take a quarter of fp32's
    memory. On CPU under bf16 autocast the product runs in torch's int8 weight kernel (_weight_int8pack_mm);
    otherwise q is converted to the input's dtype and the scale applied to the output."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
                torch.get_autocast_dtype("cpu") == torch.bfloat16:
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(x2, self.q, self.scale.to(torch.bfloat16))
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)


def quantize_int8(model):
    """Replace every nn.Linear of model (attention, feed-forward, output) by an Int8Linear, in place; the
    embedding stays as it is (a tied output layer gets its own int8 copy). Returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child).to(child.weight.device))
    return model


def model_bytes(model):
    """Bytes of the model's parameters and buffers (each shared tensor once): its size in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def training_memory(args, batch_size, seq_len=None, dtype="float32", device_type="cuda", optimizer="adamw",
                    lora_rank=0, world_size=1, parallel="ddp", activation_checkpointing=False, chunk=512):
    """Bytes per process of one training step of this model as this project runs it, by part: weights,
    gradients, optimizer state, activations kept for the backward pass, the output layer's loss chunks, and the
    peak. args: ModelArgs; batch_size: sequences per micro-step; seq_len: default args.max_seq_len; dtype:
    'float32' or 'bfloat16' (autocast; FSDP: bf16 parameters in compute); device_type: 'cpu' attends in fp32
    under autocast (Attention.forward), 'cuda' in bf16; optimizer 'adamw' (2 states per trainable weight) or
    'muon' (1 for the blocks' matrices); lora_rank > 0: LoRA on the 7 projections of every block (only the
    adapters train); parallel 'ddp' (a whole copy per process, and when world_size > 1 gradient buckets as big
    as the gradients, resident from the wrapper's creation) or 'fsdp' (weights, gradients and optimizer state
    / world_size, plus the unsharded root and two blocks in flight); activation_checkpointing: a block keeps
    only its input.
    Activations per token, counted from the tensors autograd saves in model.py's ops: a block in fp32 keeps
    10 dim + 4 hidden + n_heads + 2 floats (the two RMSNorms 3 dim + 1 each: input, normalised, scaled; q, k, v
    3 dim; wo's input dim; SwiGLU's gate, silu, up and product 4 hidden; softmax statistics n_heads); under
    bf16 autocast 44 dim + 8 hidden + 4 n_heads + 8 bytes on a CPU (norms fp32, each projection's input cast
    to bf16 apiece, attention in fp32), 36 dim + ... on a GPU (attention in bf16); outside the blocks the
    final norm, the loss's gradient of h (fp32) and the token ids; the fused loss keeps the output layer's
    weight gradient (vocab x dim fp32) from the forward pass. The peak is weights + optimizer state (+ DDP's
    buckets) + the larger of (activations + loss chunks + autocast's bf16 weight copies) and the gradients.
    What it leaves out (CUDA context, allocator caching and fragmentation, framework buffers) is why a
    measured peak is checked against it (bench.py --measure=True). Returns a dict of bytes (floats): weights,
    gradients (with DDP's buckets), optimizer, activations, loss_chunks, peak; and the counts params and
    trainable."""
    T = seq_len or args.max_seq_len
    D, L, V, nh = args.dim, args.n_layers, args.vocab_size, args.n_heads
    H = ffn_hidden_dim(args)
    kv = (args.n_kv_heads or nh) * (D // nh)
    block = 2 * D + D * D * 2 + D * kv * 2 + 3 * D * H  # norms, wq wo, wk wv, w1 w2 w3
    root = V * D * (1 if args.tie_embeddings else 2) + D
    n_params = L * block + root
    shapes = [(D, D), (D, kv), (D, kv), (D, D), (D, H), (D, H), (H, D)]  # wq wk wv wo w1 w3 w2: (in, out)
    lora = L * lora_rank * sum(i + o for i, o in shapes)  # A (r x in) and B (out x r) per projection
    trainable = lora if lora_rank else n_params
    muon = L * (block - 2 * D) if optimizer == "muon" and not lora_rank else 0
    states = 2 * (trainable - muon) + muon  # AdamW: exp_avg, exp_avg_sq; Muon: momentum
    bf16 = dtype == "bfloat16"
    shards = world_size if parallel == "fsdp" else 1
    weights = 4 * (n_params + lora) / shards
    if parallel == "fsdp" and world_size > 1:  # gathered for compute: the root all along, two blocks in flight
        weights += (2 if bf16 else 4) * (root + 2 * block)
    grads = 4 * trainable / shards
    if parallel == "fsdp" and world_size > 1:
        grads += 4 * (root + block) if not lora_rank else 0  # unsharded until reduce-scattered
    buckets = 4 * trainable if parallel == "ddp" and world_size > 1 else 0  # DDP's, allocated with the wrapper
    opt = 4 * states / shards
    if bf16:
        per_block = 44 * D + 8 * H + 4 * nh + 8 - (8 * D if device_type == "cuda" else 0)
    else:
        per_block = 4 * (10 * D + 4 * H + nh + 2)
    per_block += 4 * 7 * lora_rank * (1 if lora_rank else 0)  # each adapter's A x
    tokens = batch_size * T
    outside = 4 * (3 * D + 1) + 8
    kept = L * 4 * D + per_block if activation_checkpointing else L * per_block  # (+ one block recomputed)
    activations = tokens * (kept + outside) + 4 * V * D
    if bf16 and parallel != "fsdp":
        activations += 2 * (L * (block - 2 * D) + V * D)  # autocast's bf16 copies of the matrices
    loss_chunks = 2 * min(chunk, tokens) * V * 4  # a chunk's logits and their softmax / gradient
    total = weights + opt + buckets + max(activations + loss_chunks, grads)
    return dict(params=n_params, trainable=trainable, weights=weights, gradients=grads + buckets, optimizer=opt,
                activations=activations, loss_chunks=loss_chunks, peak=total)


def peak_flops(device=None):
    """Dense bf16 peak FLOP/s of the current CUDA GPU from its name; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    table = [("H200", 989e12), ("H100 PCIE", 756e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("4090", 165e12),
             ("3090", 71e12), ("V100", 125e12)]
    for key, flops in table:
        if key in name:
            return flops
    return None


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over targets != -1, equal to F.cross_entropy(..., ignore_index=-1).

    Written out because with an 8k+ vocabulary the loss is a large share of a small model's step on CPU:
    the softmax computed in the forward pass is kept and turned into the gradient in place
    (softmax - one_hot), which halves the time of PyTorch's log_softmax + nll_loss pair."""

    @staticmethod
    def forward(ctx, logits, targets):
        """logits (N, V), targets (N,) int64 -> 0-dim fp32 mean loss in nats over targets != -1 (0 when all are
        -1). Saves the fp32 softmax (N, V) for backward. A target probability below fp32's smallest normal
        is clamped to it: that row's loss is ~87.3 nats rather than inf."""
        probs = torch.softmax(logits.float(), dim=-1)
        valid = targets != -1
        safe = targets.clamp(min=0)
        count = valid.sum().clamp(min=1)
        picked = probs.gather(-1, safe[:, None]).squeeze(-1)
        # log of the softmax can underflow to -inf only when the target's probability is below ~1e-38
        loss = -(torch.log(picked.clamp(min=torch.finfo(torch.float32).tiny)) * valid).sum() / count
        ctx.save_for_backward(probs, safe, valid, count)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        """grad (0-dim) -> (dloss/dlogits (N, V) in logits' dtype, None): (softmax - one_hot) * grad / count,
        zero rows for ignored targets. Overwrites the saved softmax, so a second backward through the same
        graph (retain_graph=True) raises RuntimeError."""
        probs, safe, valid, count = ctx.saved_tensors
        probs[torch.arange(len(safe), device=probs.device), safe] -= 1.0  # softmax - one_hot, in place
        probs.mul_((grad / count) * valid[:, None])
        return probs.to(ctx.logits_dtype), None


def cross_entropy(logits, targets):
    """Mean cross-entropy in nats of logits (N, V) against targets (N,) (int64 class ids, -1 = ignored), a 0-dim
    fp32 tensor; matches F.cross_entropy(logits.float(), targets, ignore_index=-1), except that all-ignored
    targets give 0 instead of nan. The gradient has logits' dtype; see CrossEntropy (one backward only)."""
    return CrossEntropy.apply(logits, targets)


class LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(h @ weight.T, targets), computed chunk by chunk of rows.

    Each chunk's logits live only long enough to give the chunk's loss and its gradients (softmax - one_hot
    through the two matmuls), which are kept for backward and scaled by the incoming gradient there.
    The matmuls run in compute_dtype (bf16 under autocast), the softmax in fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk):
        """h (N, D), weight (V, D), targets (N,) int64 (-1 = ignored) -> 0-dim fp32 mean loss in nats over the
        non-ignored rows (0 when none). compute_dtype: dtype of the matmuls; chunk: rows per step, so at most
        (chunk, V) fp32 logits exist at a time. Also computes and saves the gradients (grad_h (N, D) in h's
        dtype, grad_w (V, D) fp32), which the forward pays for even under torch.no_grad. Autocast is off here."""
        with torch.autocast(h.device.type, enabled=False):
            valid = targets != -1
            safe = targets.clamp(min=0)
            count = valid.sum().clamp(min=1)
            hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk):
                e = min(h.shape[0], s + chunk)
                logits = (hc[s:e] @ wc.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += ((lse - logits.gather(-1, safe[s:e, None]).squeeze(-1)) * valid[s:e]).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(e - s, device=h.device), safe[s:e]] -= 1.0
                dlogits = probs.mul_(valid[s:e, None]).to(compute_dtype)
                grad_h[s:e] = dlogits @ wc
                grad_w += (dlogits.t() @ hc[s:e]).float()
            ctx.save_for_backward(grad_h, grad_w, count)
            ctx.weight_dtype = weight.dtype
            return loss / count

    @staticmethod
    def backward(ctx, grad):
        """grad (0-dim) -> (dloss/dh (N, D) in h's dtype, dloss/dweight (V, D) in weight's dtype, None, None,
        None): the gradients saved by forward, scaled by grad / count."""
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h, weight, targets, chunk=512):
    """cross_entropy(h @ weight.T, targets) without holding the (N, V) logits: h (N, D) final hidden states,
    weight (V, D) output matrix, targets (N,) int64 with -1 = ignored -> 0-dim fp32 mean loss in nats (0 when
    all are ignored). The matmuls run in the autocast dtype when autocast is on for h's device type, else in
    h's dtype, the softmax in fp32, `chunk` rows at a time (see LinearCrossEntropy)."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    return LinearCrossEntropy.apply(h, weight, targets, dtype, chunk)


def _is_count(x):
    """True for an integer-valued finite number >= 0 (3 or 3.0; not True, nan, inf or "3")."""
    return (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            and int(x) == x)


def right_pad(rows, device=None):
    """B lists of token ids -> (a (B, L) int64 tensor, each row's ids then zeros; their lengths as a list): the
    batch layout generate() and the scoring passes take (padding after the real tokens is never read)."""
    lens = [len(r) for r in rows]
    x = torch.zeros((len(rows), max(lens)), dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return (x if device is None else x.to(device)), lens


def check_sampling_args(temperature, top_k, top_p, repetition_penalty):
    """Raise ValueError, naming the parameter and its value, unless temperature is a finite number >= 0, top_k
    is None or an integer >= 0, top_p is None or a number in [0, 1] and repetition_penalty a finite number > 0.
    The boundaries themselves are valid: see sample_next for what each one means."""
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
    """Choose the next token per row: logits (B, V) float -> token ids (B,) int64. Order as in HF: repetition
    penalty (CTRL's, on the tokens where seen (B, V) bool is True), temperature, top-k, top-p, then one draw
    per row from the softmax with generator (a torch.Generator or None = the global RNG).

    Boundaries: temperature 0 = greedy; top_k None or 0 = off, >= V = off (every token stays), 1 = greedy;
    top_p None or 1 = off, 0 = greedy (only the top token stays); repetition_penalty 1 = off. Greedy is the
    argmax of the (penalised) logits and draws nothing from the generator.
    Raises ValueError naming the parameter and its value for temperature < 0, top_k < 0 (or not an integer),
    top_p outside [0, 1], repetition_penalty <= 0, and a non-finite temperature or repetition_penalty."""
    check_sampling_args(temperature, top_k, top_p, repetition_penalty)
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


# ---- Hugging Face interop -----------------------------------------------------------------------------

def hf_config_dict(args: ModelArgs):
    """Keyword arguments for transformers.LlamaConfig describing the same network."""
    return dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args),
                num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                num_key_value_heads=args.n_heads if args.n_kv_heads is None else args.n_kv_heads,
                max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                tie_word_embeddings=args.tie_embeddings, hidden_act="silu", attention_bias=False,
                mlp_bias=False, head_dim=args.dim // args.n_heads)


HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def to_hf_state_dict(model: Transformer):
    """Our weights under LlamaForCausalLM's names. RoPE is already rotate-half, so no permutation."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            module, param = rest.rsplit(".", 1)
            k = f"model.layers.{i}.{HF_NAMES[module]}.{param}"
        else:
            k = HF_TOP[k]
        sd[k] = v.detach().clone()
    return sd


def from_hf_state_dict(sd):
    """The inverse of to_hf_state_dict: LlamaForCausalLM's names -> ours (tensors not copied). Raises KeyError
    naming a tensor we have no place for."""
    back = {v: k for k, v in HF_NAMES.items()}
    top = {v: k for k, v in HF_TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        parts = k.split(".")  # model.layers.{i}.{self_attn|mlp|..}.{name}.weight
        module = ".".join(parts[3:-1])
        if parts[:2] != ["model", "layers"] or module not in back:
            raise KeyError(f"tensor {k!r} has no place in this Llama 2 (a bias, or another architecture?)")
        out[f"layers.{parts[2]}.{back[module]}.{parts[-1]}"] = v
    return out
