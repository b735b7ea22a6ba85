"""The Llama 2 model, written out in one file: RMSNorm, rotary embeddings (RoPE), grouped-query attention, SwiGLU
feed-forward, tied input/output embeddings; plus a plain generate with a KV cache, the optimizer's parameter groups and
an MFU estimate. The training loss uses the fused cross-entropy of babyllama/cross_entropy.py.

RoPE uses the "rotate-half" layout of Hugging Face's LlamaForCausalLM (each head's first half of dimensions pairs with
its second half), so exporting to HF renames tensors with no permutation of wq/wk (tests/unit/test_model.py proves
the logits equal)."""
from contextlib import nullcontext
from dataclasses import dataclass
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from babyllama.cross_entropy import cross_entropy, linear_cross_entropy


@dataclass
class ModelArgs:
    """Hyperparameters of the Llama 2 network (Touvron et al. 2023).

    dim: width D of the embeddings and the residual stream. n_layers: number of TransformerBlocks.
    n_heads: query heads H; head_dim = dim // n_heads (Attention asserts dim % n_heads == 0).
    n_kv_heads: grouped-query key/value heads, dividing n_heads (asserted); None = n_heads, 1 = multi-query.
    vocab_size: V, the rows of the embedding and output matrices.
    multiple_of, ffn_dim_multiplier, hidden_dim: the SwiGLU hidden width (ffn_hidden_dim); hidden_dim (None = computed)
        sets it outright, for a model from elsewhere (export.py --import_from) that the rule cannot give.
    norm_eps: epsilon added to the mean square in every RMSNorm.
    max_seq_len: longest sequence T the model takes (forward asserts T <= max_seq_len; generation keeps prompt + new
        tokens within it), the length of the RoPE tables.
    dropout: probability on the embedding output, the attention weights and every branch's output; training only.
    tie_embeddings: the output layer shares tok_embeddings' (V, D) weight.
    rope_theta: RoPE base; head dims i and i + head_dim/2 rotate by pos * rope_theta ** (-2i / head_dim) radians.
    attention_bias: wq, wk, wv add biases (Qwen2). rope_scaling: None (plain RoPE) or Llama 3.1's {"rope_type":
        "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}. Off for ours.
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
    attention_bias: bool = False
    rope_scaling: Optional[dict] = None


def ffn_hidden_dim(args):
    """Hidden width (int) of FeedForward for args (ModelArgs), LlamaConfig's intermediate_size: int(8 * dim / 3), 2/3 of
    4*dim so SwiGLU's three matrices cost what a 4*dim MLP's two do, scaled by ffn_dim_multiplier if set, rounded up to
    a multiple of multiple_of (768 for the defaults)."""
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


def llama3_inv_freq(inv_freq, s):
    """Llama 3.1's RoPE scaling of inv_freq (hd/2,) by s (ModelArgs.rope_scaling): with L its original_max_position_
    embeddings, wavelengths 2 pi / f under L / high_freq_factor are kept, those over L / low_freq_factor divided by
    factor, those between blended linearly in L / wavelength. AssertionError for a rope_type other than "llama3"."""
    assert s.get("rope_type") == "llama3", f"rope_scaling {s!r}: only rope_type 'llama3' is implemented"
    wavelen, L = 2 * math.pi / inv_freq, s["original_max_position_embeddings"]
    smooth = (L / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > L / s["low_freq_factor"], inv_freq / s["factor"], blended)
    return torch.where(wavelen < L / s["high_freq_factor"], inv_freq, scaled)


def rope_cos_sin(head_dim, max_len, theta, scaling=None):
    """cos and sin tables (max_len, head_dim) in rotate-half layout: frequency i sits at i and i+head_dim/2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:  # ModelArgs.rope_scaling
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotary position embedding (RoPE, Su et al. 2021) in rotate-half layout. x (B, H, T, hd) with hd even;
    cos, sin from rope_cos_sin indexed by position, (T, hd) or (B, 1, T, hd). Returns x's shape, in the dtype
    promoted with cos/sin's (the fp32 tables turn bf16 x into fp32)."""
    # rotates each pair (x_i, x_{i+hd/2}) by angle pos * freq_i
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal self-attention with RoPE on queries and keys and grouped-query attention (GQA, Ainslie et al.
    2023): n_kv_heads key/value heads, each shared by n_heads // n_kv_heads consecutive query heads
    (n_kv_heads == n_heads is plain multi-head attention). Bias-free wq, wk, wv, wo, as in Llama 2
    (args.attention_bias: wq, wk, wv with biases, as in Qwen2).
    Raises AssertionError unless dim % n_heads == 0 and n_heads % n_kv_heads == 0."""

    def __init__(self, args):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        assert args.dim % args.n_heads == 0 and args.n_heads % self.n_kv_heads == 0
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=args.attention_bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=0, wqkv=None):
        """x (B, T, D) -> (B, T, D). cos, sin: RoPE tables of the T positions, (T, hd) or (B, 1, T, hd). mask: None =
        causal (the queries must then start at position 0, or T == 1), else a boolean mask broadcastable to (B, H, T,
        S), True = may attend, S the keys (T, or cache_pos + T with a cache). cache: (k, v) buffers (B, n_kv_heads, L,
        hd), written in place at columns [cache_pos, cache_pos + T); the queries attend to columns [0, cache_pos + T).
        wqkv: optional stacked [wq; wk; wv] weight ((n_heads + 2 * n_kv_heads) * hd, D) for the three (biases kept).
        AssertionError when mask is None, T > 1 and cache_pos != 0."""
        B, T, _ = x.shape
        if wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:  # generation passes [wq; wk; wv] stacked: one matrix-vector product reads weights faster
            kv_dim = self.n_kv_heads * self.head_dim
            bias = None if self.wq.bias is None else torch.cat((self.wq.bias, self.wk.bias, self.wv.bias))
            q, k, v = F.linear(x, wqkv, bias).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
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
    checkpointing = True (activation checkpointing, Chen et al. 2016): in training only the block's input is kept and
    the rest recomputed in backward, one (B, T, D) tensor per layer for ~1/3 more compute, same gradients (dropout masks
    replay from the saved RNG state). Set per block (dist.parallelize): FSDP gathers the weights once for it."""
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
    """The Llama 2 decoder-only language model: token embedding (V, D), n_layers TransformerBlocks, a final RMSNorm and
    a bias-free output projection to V logits, tied to the embedding when args.tie_embeddings. The RoPE tables
    (max_seq_len, head_dim) are non-persistent buffers. Linear and embedding weights start N(0, 0.02), the residual
    projections wo and w2 N(0, 0.02 / sqrt(2 * n_layers)). AssertionError for args that Attention rejects."""

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
        cos, sin = rope_cos_sin(args.dim // args.n_heads, args.max_seq_len, args.rope_theta, args.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._decode_step = None  # a compiled decode step: set by babyllama.generate.compile_decode
        self.apply(self._init_weights)
        # the 2 residual projections a layer start at 1/sqrt(2 n_layers) scale (GPT-2): depth does not grow the variance
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)  # attention_bias: a new model starts as the bias-free one

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
        """Inference forward with explicit per-row positions (B, T) and a boolean attention mask (B, 1, T, S),
        optionally reading/writing KV caches. Returns logits (B, T, V), or with head=False the final normalised hidden
        states (B, T, D), for callers that need the logits of a few positions only."""
        cos = self.rope_cos[pos].unsqueeze(1)  # (B, 1, T, hd)
        sin = self.rope_sin[pos].unsqueeze(1)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, None if caches is None else caches[i], cache_pos,
                      (None, None) if fused is None else fused[i])
        h = self.norm(h)
        return self.output(h) if head else h

    # ---- generation ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_k=None):
        """nanoGPT's generate, with a KV cache: prompts idx (B, T) int64, all of length T -> (B, T + max_new_tokens),
        each new token the argmax (temperature 0) or a draw from softmax(logits / temperature) over the top_k.
        AssertionError unless T + max_new_tokens <= max_seq_len. generate.py has ragged prompts, top-p, stop tokens."""
        B, T = idx.shape
        total = T + max_new_tokens
        assert total <= self.args.max_seq_len, f"{T} + {max_new_tokens} tokens > max_seq_len {self.args.max_seq_len}"
        kv_shape = (B, self.layers[0].attention.n_kv_heads, total, self.args.dim // self.args.n_heads)
        caches = [(idx.new_empty(kv_shape, dtype=self.tok_embeddings.weight.dtype),
                   idx.new_empty(kv_shape, dtype=self.tok_embeddings.weight.dtype)) for _ in self.layers]
        pos = torch.arange(total, device=idx.device).expand(B, total)
        start = 0  # the first step feeds the whole prompt (the prefill), later steps the newest token only
        for _ in range(max_new_tokens):
            end = idx.shape[1]
            logits = self._forward_positions(idx[:, start:], pos[:, start:end], None, caches, start)[:, -1].float()
            if temperature == 0.0:
                next_tok = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_tok = torch.multinomial(logits.softmax(dim=-1), 1)
            idx = torch.cat((idx, next_tok), dim=1)
            start = end
        return idx

    # ---- training helpers ----------------------------------------------------------------------------

    def optimizer_groups(self, weight_decay, muon=False):
        """The parameters that require grad, grouped for the optimizer: ([AdamW groups], [Muon matrices]). AdamW:
        matrices get weight_decay; RMSNorm weights and tok_embeddings.weight (with a tied output; an untied one is
        decayed) get 0. muon=True: the blocks' 2-D matrices (wq ... w3, LoRA adapters there too) go to Muon, as
        modded-nanogpt and nanochat split them (empty AdamW groups then left out). babyllama/optimize.py builds the
        optimizers."""
        decay, no_decay, hidden = [], [], []
        for name, p in self.named_parameters():  # a tied weight appears once, as tok_embeddings.weight
            if not p.requires_grad:
                continue
            if muon and p.dim() == 2 and name.startswith("layers."):
                hidden.append(p)
                continue
            (decay if p.dim() >= 2 and "tok_embeddings" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return ([g for g in groups if g["params"]] if muon else groups), hidden

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
