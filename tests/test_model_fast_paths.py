"""The speed paths of model.py give the same numbers as the plain ones."""
import torch

from model import ModelArgs, Transformer


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=32)
    args.update(kw)
    return Transformer(ModelArgs(**args))


def loss_and_grads(model, x, y, return_logits):
    model.zero_grad()
    _, loss = model(x, y, return_logits=return_logits)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_fused_output_and_loss_equal_logits_then_cross_entropy():
    for tie in (True, False):
        model = tiny(tie_embeddings=tie)
        x = torch.randint(0, 300, (3, 32))
        y = torch.randint(0, 300, (3, 32))
        y[0, :5] = -1  # ignored targets
        l1, g1 = loss_and_grads(model, x, y, True)
        l2, g2 = loss_and_grads(model, x, y, False)
        assert abs(l1 - l2) < 1e-5
        for k in g1:
            assert torch.allclose(g1[k], g2[k], atol=1e-6), k


def test_chunked_linear_cross_entropy_with_ragged_chunks():
    # a chunk smaller than the rows and not dividing them: several chunks and a ragged last one
    from babyllama.cross_entropy import linear_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(96, 64, requires_grad=True)
    w = torch.randn(300, 64, requires_grad=True)
    t = torch.randint(0, 300, (96,))
    t[::5] = -1
    fused = linear_cross_entropy(h, w, t, chunk=40)
    fused.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=-1)
    ref.backward()
    assert torch.allclose(fused, ref, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def test_custom_cross_entropy_equals_torch():
    logits = torch.randn(50, 300, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    t[::7] = -1
    from babyllama.cross_entropy import cross_entropy
    a = cross_entropy(logits, t)
    a.backward()
    ga = logits.grad.clone()
    logits.grad = None
    b = torch.nn.functional.cross_entropy(logits, t, ignore_index=-1)
    b.backward()
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, logits.grad, atol=1e-7)


def test_bf16_autocast_training_step_close_to_fp32():
    # bf16 autocast on CPU (used for speed) must compute the same loss to bf16 precision
    model = tiny()
    x = torch.randint(0, 300, (2, 32))
    _, l32 = model(x[:, :-1], x[:, 1:], return_logits=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, l16 = model(x[:, :-1], x[:, 1:], return_logits=False)
    assert abs(l32.item() - l16.item()) < 0.02 * l32.item()
