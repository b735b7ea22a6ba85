"""Inference: a checkpoint's model and tokenizer on a device, ready to generate or score (eval.py, serve.py...)."""
import os

from babyllama.checkpoint_io import file_sha256
from babyllama.models import load_model
from babyllama.precision import amp_setup, configure_cpu, resolve_device, resolve_dtype
from tokenizer import load_tokenizer
from tokenizer.tokenizer import resolve_path


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
    (checkpoint_tokenizer: tokenizer_model, or "" for the recorded one or the copy beside the checkpoint). Building
    the model draws from torch's RNG: seed it first for samples that repeat. Returns (model, tok, checkpoint, device,
    autocast context)."""
    device, autocast_ctx = inference_precision(device, dtype)
    model, ckpt = load_model(ckpt_path, device)
    model.eval()
    tok = checkpoint_tokenizer(ckpt, ckpt_path, model.args.vocab_size, tokenizer_model)
    return model, tok, ckpt, device, autocast_ctx


def checkpoint_tokenizer(ckpt, ckpt_path, vocab_size, tokenizer_model=""):
    """The tokenizer the checkpoint (dict ckpt, read from ckpt_path) was trained with, first found of: tokenizer_model
    (a --tokenizer_model= option; "" = none), the path the checkpoint records if it exists from here, the copy beside
    the checkpoint (the recorded file name in its folder, or its tokenizer.model / tokenizer.json:
    checkpoint_io.keep_tokenizer). Each is checked against the recorded sha256 (a recorded path that now holds another
    tokenizer is passed over) and vocab_size (load_tokenizer). SystemExit naming the files: a tokenizer_model that is
    not the recorded tokenizer, or none found (the recorded path, the place beside, the option)."""
    recorded, sha256 = ckpt.get("tokenizer") or "", ckpt.get("tokenizer_sha256") or ""
    where = f"{ckpt_path} records {recorded or 'no tokenizer'}" + (f" (sha256 {sha256[:12]}...)" if sha256 else "")
    if tokenizer_model:
        path = resolve_path(tokenizer_model)
        if sha256 and file_sha256(path) != sha256:
            raise SystemExit(f"--tokenizer_model={path} is not the tokenizer the model was trained with "
                             f"(sha256 {file_sha256(path)[:12]}...): {where}")
        return load_tokenizer(path, vocab_size)
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    names = ([os.path.basename(os.path.normpath(recorded))] if recorded else []) + ["tokenizer.model", "tokenizer.json"]
    beside = [os.path.join(folder, n) for n in dict.fromkeys(names)]
    candidates = [resolve_path(p) for p in [recorded] + beside if p and os.path.exists(p)]
    for path in dict.fromkeys(candidates):
        if not sha256 or file_sha256(path) == sha256:
            return load_tokenizer(path, vocab_size)
    if candidates:
        raise SystemExit(f"{', '.join(dict.fromkeys(candidates))} is not the tokenizer the model was trained with "
                         f"(none has its sha256): {where}; give that tokenizer with --tokenizer_model=")
    raise SystemExit(f"tokenizer model not found: {where}, which does not exist from {os.getcwd()}, and no copy lies "
                     f"beside the checkpoint ({' or '.join(beside)}); give it with --tokenizer_model=")
