"""Int8 weight-only quantisation for inference: Int8Linear, quantize_int8, quantize_model (eval.py and serve.py
--quantize=int8) and model_bytes, the memory it saves."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Linear(nn.Module):
    """A bias-free inference linear layer whose weight (out, in) is int8 with one scale per output row: W ~ q * scale[:,
    None], scale = max|W_row| / 127, so each weight is off by at most scale / 2 and y_j by at most (scale_j / 2) * sum_i
    |x_i|; a quarter of fp32's memory. On CPU under bf16 autocast torch's int8 weight kernel (_weight_int8pack_mm) runs
    it; otherwise q is cast to the input's dtype and the scale applied to the output. The bias of the replaced layer, if
    any (model.py's attention_bias), is kept in fp32 and added."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x):
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
                torch.get_autocast_dtype("cpu") == torch.bfloat16:
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(x2, self.q, self.scale.to(torch.bfloat16))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def quantize_int8(model):
    """Replace every nn.Linear of model by an Int8Linear, in place; the embedding stays (a tied output layer gets its
    own int8 copy). Returns model."""
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


def quantize_model(model, kind):
    """Quantize model's weights in place: kind '' (leave them) or 'int8'. Returns (bytes before, bytes after)
    (model_bytes). SystemExit for any other kind."""
    if kind not in ("", "int8"):
        raise SystemExit(f"quantize must be '' or 'int8', not {kind!r}")
    before = model_bytes(model)
    if kind == "int8":
        quantize_int8(model)
    return before, model_bytes(model)
