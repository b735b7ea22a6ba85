"""Independent reference tests for model.py (Llama 2 architecture).

The references are Hugging Face transformers' LlamaForCausalLM (logit parity
after converting our weights with to_hf_state_dict) and hand calculations
(cross-entropy, parameter count, init statistics, optimizer groups).
"""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from babyllama.hf import hf_config_dict, to_hf_state_dict
from babyllama.optimize import configure_optimizers
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (conftest.py)


def make_args(**overrides):
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
              ffn_dim_multiplier=None, norm_eps=1e-5, max_seq_len=64, dropout=0.0,
              tie_embeddings=True, rope_theta=10000.0)
    kw.update(overrides)
    return ModelArgs(**kw)


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    """The Llama 2 rule, written out independently of model.py."""
    h = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def randomize_(model, seed, std=0.1):
    """Overwrite every parameter in place (in place keeps a tied embedding/output
    tied). Norm weights are moved away from 1 so a norm mistake shows up in the
    logits, and matrices get std 0.1 (not 0.02) so attention is far from uniform
    and a RoPE/head-layout mistake changes the logits substantially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def build_hf_twin(model):
    cfg = LlamaConfig(**hf_config_dict(model.args))
    hf = LlamaForCausalLM(cfg).float()
    sd = to_hf_state_dict(model)
    expected = set(hf.state_dict().keys())
    got = set(sd.keys())
    assert got == expected, (
        f"to_hf_state_dict keys differ from LlamaForCausalLM's: "
        f"missing={sorted(expected - got)} unexpected={sorted(got - expected)}")
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True)
    hf.eval()
    return hf


def check_parity(args, seed, T=20, B=2):
    torch.manual_seed(seed)
    model = Transformer(args)
    randomize_(model, seed + 1)
    model.eval()
    hf = build_hf_twin(model)
    g = torch.Generator().manual_seed(seed + 2)
    tokens = torch.randint(0, args.vocab_size, (B, T), generator=g)
    with torch.no_grad():
        ours, loss = model(tokens)
        ref = hf(input_ids=tokens).logits
    assert loss is None
    assert ours.shape == (B, T, args.vocab_size)
    # the logits must be non-trivial for the comparison to mean anything
    assert ref.std() > 0.1
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= 1e-4, f"max |logits - HF logits| = {diff:.3e}"
    return model, hf


def test_logits_match_hf_llama_with_gqa():
    check_parity(make_args(n_heads=4, n_kv_heads=2), seed=0)


def test_logits_match_hf_llama_without_gqa():
    check_parity(make_args(n_heads=4, n_kv_heads=4), seed=10)


def test_logits_match_hf_llama_untied_ffn_multiplier_mqa_rope_theta():
    # untied output head, ffn_dim_multiplier (h = 32*ceil(int(1.3*256)/32) = 352),
    # multi-query attention (1 kv head) and a non-default rope_theta (a small
    # base makes a wrong theta visible even on a 20-token sequence).
    args = make_args(dim=96, n_heads=6, n_kv_heads=1, multiple_of=32, ffn_dim_multiplier=1.3,
                     tie_embeddings=False, rope_theta=500.0)
    model, hf = check_parity(args, seed=20)
    assert model.layers[0].feed_forward.w1.weight.shape == (352, 96)
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)


def test_loss_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    args = make_args()
    model = Transformer(args)
    randomize_(model, 1)
    model.eval()
    B, T, V = 3, 12, args.vocab_size
    tokens = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets[0, :4] = -1
    targets[1, 7] = -1
    targets[2, -1] = -1
    with torch.no_grad():
        logits, loss = model(tokens, targets)
    assert logits.shape == (B, T, V)
    assert loss is not None and loss.ndim == 0
    logits = logits.double()
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = targets != -1
    nll = -logprobs[valid].gather(-1, targets[valid].unsqueeze(-1)).squeeze(-1)
    expected = nll.sum() / valid.sum()
    assert abs(loss.item() - expected.item()) < 1e-5, (loss.item(), expected.item())
    # the -1 targets must really be excluded (the mean over all positions with
    # some arbitrary class would differ)
    assert valid.sum() == B * T - 6


def expected_num_params(a, tied):
    hd = a.dim // a.n_heads
    kv = a.n_kv_heads * hd
    h = ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier)
    per_layer = (a.dim * a.dim  # wq
                 + 2 * a.dim * kv  # wk, wv
                 + a.dim * a.dim  # wo
                 + 3 * a.dim * h  # w1, w2, w3
                 + 2 * a.dim)  # attention_norm, ffn_norm
    emb = a.vocab_size * a.dim
    return emb * (1 if tied else 2) + a.n_layers * per_layer + a.dim


def test_num_params_counts_tied_weights_once():
    args = make_args()
    model = Transformer(args)
    # tied: output.weight is the same tensor as tok_embeddings.weight
    assert model.output.weight is model.tok_embeddings.weight
    h = ffn_hidden_dim(64, 16, None)
    assert h == 176  # int(512/3)=170 -> 16*ceil(170/16) = 176
    assert model.layers[0].feed_forward.w1.weight.shape == (h, 64)
    assert model.layers[0].attention.wk.weight.shape == (2 * 16, 64)
    # hand count: 128*64 + 2*(64*64 + 2*64*32 + 64*64 + 3*64*176 + 2*64) + 64 = 100672
    assert expected_num_params(args, tied=True) == 100672
    assert model.num_params() == 100672

    args_u = make_args(tie_embeddings=False)
    model_u = Transformer(args_u)
    assert model_u.num_params() == 100672 + 128 * 64


def test_init_std_scaled_on_residual_projections():
    torch.manual_seed(0)
    n_layers = 4
    args = make_args(dim=256, n_layers=n_layers, n_heads=8, n_kv_heads=4, vocab_size=512,
                     multiple_of=32)
    model = Transformer(args)
    base = 0.02
    scaled = 0.02 / math.sqrt(2 * n_layers)

    def close(t, target, name):
        s = t.detach().float().std().item()
        assert abs(s - target) / target < 0.10, f"{name}: std {s:.5f}, expected {target:.5f}"
        assert abs(t.detach().float().mean().item()) < 0.1 * target, f"{name}: mean not ~0"

    close(model.tok_embeddings.weight, base, "tok_embeddings")
    for i, layer in enumerate(model.layers):
        att, ff = layer.attention, layer.feed_forward
        close(att.wq.weight, base, f"layers.{i}.wq")
        close(att.wk.weight, base, f"layers.{i}.wk")
        close(att.wv.weight, base, f"layers.{i}.wv")
        close(att.wo.weight, scaled, f"layers.{i}.wo")
        close(ff.w1.weight, base, f"layers.{i}.w1")
        close(ff.w3.weight, base, f"layers.{i}.w3")
        close(ff.w2.weight, scaled, f"layers.{i}.w2")
        assert torch.all(layer.attention_norm.weight == 1)
        assert torch.all(layer.ffn_norm.weight == 1)
    assert torch.all(model.norm.weight == 1)
    for name, p in model.named_parameters():
        assert not name.endswith("bias"), f"unexpected bias {name}"


def _groups_by_param(optimizer):
    where = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where.setdefault(id(p), []).append(gi)
    return where


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_groups(tie):
    model = Transformer(make_args(tie_embeddings=tie))
    wd, lr, betas = 0.1, 6e-4, (0.9, 0.95)
    opt = configure_optimizers(model, wd, lr, betas, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(lr)
        assert tuple(group["betas"]) == betas
    where = _groups_by_param(opt)

    params = dict(model.named_parameters())  # de-duplicates the tied tensor
    # every parameter exactly once, and nothing else
    for name, p in params.items():
        assert len(where.get(id(p), [])) == 1, f"{name} appears in groups {where.get(id(p))}"
    assert set(where) == {id(p) for p in params.values()}

    def decay_of(p):
        return opt.param_groups[where[id(p)][0]]["weight_decay"]

    for name, p in params.items():
        if p.ndim < 2:
            assert decay_of(p) == 0.0, f"norm/1-D param {name} is decayed"
    emb = model.tok_embeddings.weight
    assert decay_of(emb) == 0.0, "embedding (tied with output when tied) must not be decayed"
    for i, layer in enumerate(model.layers):
        for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
                    layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3):
            assert decay_of(lin.weight) == pytest.approx(wd), f"layer {i} matmul weight not decayed"


def test_causal_no_future_leak():
    torch.manual_seed(0)
    args = make_args()
    model = Transformer(args)
    randomize_(model, 3)
    model.eval()
    T, t = 16, 6
    a = torch.randint(0, args.vocab_size, (2, T))
    b = a.clone()
    b[:, t + 1:] = (a[:, t + 1:] + 1 + torch.randint(0, args.vocab_size - 1, (2, T - t - 1))) % args.vocab_size
    assert torch.all(b[:, t + 1:] != a[:, t + 1:])
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    assert torch.allclose(la[:, : t + 1], lb[:, : t + 1], atol=1e-5, rtol=0)
    # sanity: the changed positions themselves do change
    assert (la[:, t + 1:] - lb[:, t + 1:]).abs().max() > 1e-3
