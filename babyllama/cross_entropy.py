"""Cross-entropy kernels for the training loss: a plain one that reuses its softmax as the gradient, and one fused
with the output layer that never holds the (N, V) logits (model.py's forward uses both)."""
import torch


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over targets != -1, equal to F.cross_entropy(..., ignore_index=-1). Written out because with
    an 8k+ vocabulary the loss is a large share of a small model's CPU step: the forward's softmax is kept and turned
    into the gradient in place (softmax - one_hot), half the time of PyTorch's log_softmax + nll_loss."""

    @staticmethod
    def forward(ctx, logits, targets):
        """logits (N, V), targets (N,) int64 -> 0-dim fp32 mean loss in nats over targets != -1 (0 if none). Saves the
        fp32 softmax (N, V). A target probability below fp32's smallest normal is clamped: ~87.3 nats, not inf."""
        probs = torch.softmax(logits.float(), dim=-1)
        valid = targets != -1
        safe = targets.clamp(min=0)
        count = valid.sum().clamp(min=1)
        picked = probs.gather(-1, safe[:, None]).squeeze(-1)
        loss = -(torch.log(picked.clamp(min=torch.finfo(torch.float32).tiny)) * valid).sum() / count
        ctx.save_for_backward(probs, safe, valid, count)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        """grad (0-dim) -> (dloss/dlogits (N, V) in logits' dtype, None), zero rows for ignored targets. Overwrites the
        saved softmax: a second backward (retain_graph=True) raises RuntimeError."""
        probs, safe, valid, count = ctx.saved_tensors
        probs[torch.arange(len(safe), device=probs.device), safe] -= 1.0  # softmax - one_hot, in place
        probs.mul_((grad / count) * valid[:, None])
        return probs.to(ctx.logits_dtype), None


def cross_entropy(logits, targets):
    """Mean cross-entropy in nats, 0-dim fp32, of logits (N, V) against targets (N,) int64 (-1 = ignored): as
    F.cross_entropy(logits.float(), targets, ignore_index=-1), but 0, not nan, if all are ignored. One backward."""
    return CrossEntropy.apply(logits, targets)


class LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(h @ weight.T, targets), chunk by chunk of rows: each chunk's logits live only long enough to
    give its loss and gradients, kept for backward. Matmuls in compute_dtype (bf16 under autocast), softmax in fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk):
        """h (N, D), weight (V, D), targets (N,) int64 (-1 = ignored) -> 0-dim fp32 mean loss in nats (0 when all
        ignored). chunk: rows per step, so at most (chunk, V) fp32 logits at a time. Also computes the gradients (grad_h
        (N, D) in h's dtype, grad_w (V, D) fp32), paid for even under torch.no_grad. Autocast is off here."""
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
        """grad (0-dim) -> (dloss/dh (N, D) in h's dtype, dloss/dweight (V, D) in weight's dtype, None, None, None)."""
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h, weight, targets, chunk=512):
    """cross_entropy(h @ weight.T, targets) without holding the (N, V) logits: h (N, D), weight (V, D), targets (N,)
    int64 (-1 = ignored) -> 0-dim fp32 mean loss in nats (0 when all ignored). Matmuls in the autocast dtype when
    autocast is on for h's device, else h's dtype; `chunk` rows at a time."""
    device_type = h.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    return LinearCrossEntropy.apply(h, weight, targets, dtype, chunk)
