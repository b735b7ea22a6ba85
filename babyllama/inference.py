"""Inference: a checkpoint's model and tokenizer on a device, ready to generate or score (eval.py, serve.py...)."""
from babyllama.models import load_model
from babyllama.precision import amp_setup, configure_cpu, resolve_device, resolve_dtype
from tokenizer import load_tokenizer


def inference_precision(device="auto", dtype="auto"):
    """(device, autocast context) for gradient-free forward passes: 'auto' device and dtype as precision.resolve_device
    / resolve_dtype decide; on CPU the CPU settings every script uses. SystemExit naming the allowed dtypes."""
    device = resolve_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        configure_cpu()
    autocast_ctx, _ = amp_setup(device_type, resolve_dtype(dtype, device_type))
    return device, autocast_ctx


def load_for_inference(ckpt_path, device="auto", dtype="auto", tokenizer_model=""):
    """Any checkpoint this project writes (models.load_model) in eval mode on device, and its tokenizer
    (tokenizer_model, or "" for the recorded one; load_tokenizer's checks). Building the model draws from torch's RNG:
    seed it first for samples that repeat. Returns (model, tok, checkpoint, device, autocast context)."""
    device, autocast_ctx = inference_precision(device, dtype)
    model, ckpt = load_model(ckpt_path, device)
    model.eval()
    tok = load_tokenizer(tokenizer_model or ckpt.get("tokenizer") or "", model.args.vocab_size,
                         ckpt.get("tokenizer_sha256") or "")
    return model, tok, ckpt, device, autocast_ctx

