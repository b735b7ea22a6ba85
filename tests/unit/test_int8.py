"""babyllama/int8.py, weight-only int8 (Int8Linear): each output within its hand-derived bound, the model's logits
close to full precision, generation and the bf16 kernel path working, a quarter of the linear layers' memory."""
from conftest import tiny_model
import torch
import torch.nn as nn

from babyllama.generate import generate
from babyllama.int8 import Int8Linear, model_bytes, quantize_int8


def test_int8_linear_error_is_within_half_a_step_per_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(5, 64)
    q = Int8Linear(lin)
    step = lin.weight.abs().amax(1) / 127  # one quantisation step per output row
    # |y_j - y'_j| = |sum_i x_i (W_ji - W'_ji)| <= sum_i |x_i| * step_j / 2
    bound = x.abs().sum(1, keepdim=True) * step[None, :] / 2
    assert ((q(x) - lin(x)).abs() <= bound * (1 + 1e-5) + 1e-6).all()
    assert q.q.dtype == torch.int8 and q.q.abs().max() == 127


def test_bf16_kernel_path_agrees_with_the_plain_path():
    torch.manual_seed(1)
    q = Int8Linear(nn.Linear(64, 96, bias=False))
    x = torch.randn(3, 7, 64)
    plain = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = q(x)
    assert fast.shape == plain.shape and fast.dtype == torch.bfloat16
    assert torch.allclose(fast.float(), plain, rtol=2e-2, atol=2e-2 * plain.abs().max().item())


def test_quantized_model_logits_stay_close_and_it_generates():
    model = tiny_model(2, vocab_size=300, max_seq_len=32).eval()
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(idx)[0]
    full_bytes = model_bytes(model)
    quantize_int8(model)
    with torch.no_grad():
        q = model(idx)[0]
    # each weight moves by at most 1/254 of its row's largest: the logits move by about that share (stated
    # bound: 1% of their spread), and the most likely token rarely changes
    assert (q - full).abs().max() <= 0.01 * (full.max() - full.min())
    assert (q.argmax(-1) == full.argmax(-1)).float().mean() >= 0.95
    out = generate(model, idx[:, :5], 6, temperature=0.0)
    assert [len(o) for o in out] == [6, 6]
    # every linear weight of the blocks: 4 bytes -> 1, plus a 4-byte scale per row; the (tied) embedding stays
    # fp32 and the output layer gets an int8 copy of it
    blocks = [m for n, m in model.named_modules() if isinstance(m, Int8Linear) and n != "output"]
    expected = full_bytes - sum(3 * m.q.numel() - 4 * m.out_features for m in blocks) + 300 * 64 + 4 * 300
    assert model_bytes(model) == expected


def test_a_layer_with_a_bias_keeps_it():
    """model.py's attention_bias (an imported Qwen2): quantising must not drop the biases."""
    model = tiny_model(3, attention_bias=True).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.bias.normal_(0, 1.0)
        idx = torch.randint(0, 128, (1, 12))
        full = model(idx)[0]
        quantize_int8(model)
        q = model(idx)[0]
    assert (q - full).abs().max() <= 0.01 * (full.max() - full.min())
