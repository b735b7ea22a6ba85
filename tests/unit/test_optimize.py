"""babyllama/optimize.py: AdamW's weight-decay groups (matrices decayed, norms and embeddings not, every
parameter once), and Muon's update against a Newton-Schulz iteration written here from the paper's description."""
import math

from conftest import tiny_model
import numpy as np
import pytest
import torch

from babyllama.optimize import configure_optimizers


def _groups_by_param(optimizer):
    where = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where.setdefault(id(p), []).append(gi)
    return where


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_groups(tie):
    model = tiny_model(tie_embeddings=tie)
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



def newton_schulz(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """The quintic Newton-Schulz iteration of Jordan et al. (2024), in float64: X <- aX + (bA + cA^2)X with
    A = X X^T, from X = G / ||G||_F, on the wide orientation of G."""
    x = g / np.linalg.norm(g)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def test_muon_update_is_the_orthogonalised_nesterov_momentum_scaled_to_adamw():
    model = tiny_model(0, dim=8, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=4)
    lr, wd, mu = 0.05, 0.1, 0.95
    opt = configure_optimizers(model, wd, lr, (0.9, 0.95), "cpu", optimizer="muon")
    adamw, muon = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {f"layers.0.{m}.weight" for m in ("attention.wq", "attention.wk", "attention.wv",
                                                        "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                        "feed_forward.w3")}
    assert {names[id(p)] for g in adamw.param_groups for p in g["params"]} == set(names.values()) - in_muon
    rng = np.random.default_rng(0)
    # momentum as the paper writes it: buf = mu buf + g, update = g + mu buf (Nesterov); torch keeps an
    # average instead, which only rescales the update, and the orthogonalisation removes the scale
    for name in ("layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"):  # square, and tall (w1)
        p = dict(model.named_parameters())[name]
        buf, scale = np.zeros(p.shape), lr * 0.2 * math.sqrt(max(p.shape))  # Liu et al. 2025's RMS match
        for step in range(2):
            w = p.detach().double().numpy().copy()
            g = rng.standard_normal(p.shape)
            for q in model.parameters():
                q.grad = torch.zeros_like(q)
            p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            buf = mu * buf + g
            o = newton_schulz(g + mu * buf)
            expected = w * (1 - lr * wd) - scale * o
            # NS runs in bf16 in torch: a relative error of ~1% in the step; an unorthogonalised step would be
            # off by far more (checked below)
            err = np.abs(p.detach().double().numpy() - expected).max() / (scale * np.abs(o).max())
            assert err < 0.03, (name, step, err)
        plain = (g + mu * buf) / np.linalg.norm(g + mu * buf)
        assert np.abs(newton_schulz(g + mu * buf) - plain).max() > 0.2  # orthogonalising changes the update
