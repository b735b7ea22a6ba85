"""
Evaluate a checkpoint: continuation samples for a list of prompts, and validation loss / perplexity on a
token file.

    python eval.py --ckpt_path=out/pretrain/ckpt.pt
    python eval.py --prompts="['春眠不觉晓，']" --temperature=0.0 --stream=True
    python eval.py --mode=loss --val_data=out/data/poetry/val.bin
"""
import math
import os
import sys
import time

import numpy as np
import torch

from configurator import apply_overrides
from model import ModelArgs, Transformer
from tokenizer import StreamDecoder, Tokenizer
import train_utils as tu

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"
tokenizer_model = ""  # "" = the tokenizer recorded in the checkpoint
mode = "sample"  # 'sample', 'loss', or 'all' (chat and benchmarks come with later stages)
prompts = ["床前明月光，疑是地上霜。举头望明月，", "白日依山尽，", "春眠不觉晓，", "明月几时有？"]
prompt_file = ""  # one prompt per line; replaces `prompts`
max_new_tokens = 64
temperature = 0.8  # 0 = greedy
top_k = 50  # 0 = off
top_p = 0.95  # 1.0 = off
repetition_penalty = 1.1  # 1.0 = off
num_samples = 1
stream = False  # print tokens as they come (prompts one by one)
val_data = ""  # token file for loss/perplexity; "" = val.bin of the data the checkpoint was trained on
val_max_tokens = 200_000  # evaluate at most this many tokens, in consecutive non-overlapping windows
batch_size = 8
seed = 1337
compile = False  # compile the decode step: pays off for long or many generations
device = "auto"
dtype = "auto"
# -----------------------------------------------------------------------------------------------------------


def load_model(path, device):
    ckpt = tu.load_checkpoint(path, device)
    model = Transformer(ModelArgs(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, ckpt


def sample(model, tok, prompt_list, device, autocast_ctx):
    """Continue each prompt; all prompts go through generate() together as one padded batch."""
    # every training document follows an eos, so starting a prompt with eos puts the model at a document start
    encoded = [[tok.eos_id] + tok.encode(p) for p in prompt_list]
    lens = [len(e) for e in encoded]
    idx = torch.zeros((len(encoded), max(lens)), dtype=torch.long)
    for i, e in enumerate(encoded):
        idx[i, :len(e)] = torch.tensor(e)
    opts = dict(temperature=temperature, top_k=top_k or None, top_p=top_p if top_p < 1.0 else None,
                repetition_penalty=repetition_penalty, stop_ids=[tok.eos_id])
    results = []
    for s in range(num_samples):
        if stream:
            for p, e in zip(prompt_list, encoded):
                print(p, end="", flush=True)
                dec = StreamDecoder(tok)
                with autocast_ctx:
                    for t in model.generate_stream(torch.tensor(e, device=device), max_new_tokens, **opts):
                        if t != tok.eos_id:
                            print(dec.put(t), end="", flush=True)
                print(dec.flush(), flush=True)
            continue
        t0 = time.time()
        with autocast_ctx:
            outs = model.generate(idx.to(device), max_new_tokens, prompt_lens=lens, **opts)
        dt = time.time() - t0
        n_new = sum(len(o) for o in outs)
        for p, o in zip(prompt_list, outs):
            text = tok.decode([t for t in o if t != tok.eos_id])
            print(f"--- {p}{text}")
            results.append({"prompt": p, "completion": text})
        print(f"(sample {s + 1}/{num_samples}: {n_new} tokens in {dt:.2f}s, {n_new / dt:.1f} tok/s)")
    return results


@torch.no_grad()
def val_loss(model, path, device, autocast_ctx):
    """Mean next-token loss over consecutive windows of the file (every token scored once)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    T = model.args.max_seq_len
    n_windows = min((len(data) - 1) // T, max(1, val_max_tokens // T))
    if n_windows < 1:
        raise SystemExit(f"{path}: {len(data)} tokens, fewer than one window of {T + 1}")
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = [data[w * T:w * T + T + 1].astype(np.int64) for w in range(start, min(n_windows, start + batch_size))]
        xy = torch.from_numpy(np.stack(rows)).to(device)
        with autocast_ctx:
            _, loss = model(xy[:, :-1], xy[:, 1:])
        total += loss.item() * len(rows) * T
        count += len(rows) * T
    return total / count, count


if __name__ == "__main__":
    apply_overrides(globals())
    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        tu.configure_cpu()
    autocast_ctx, _ = tu.amp_setup(device_type, tu.resolve_dtype(dtype, device_type))
    torch.manual_seed(seed)
    model, ckpt = load_model(ckpt_path, device)
    if compile:
        model.compile_decode()
    print(f"loaded {ckpt_path}: iteration {ckpt['iter_num']}, {model.num_params() / 1e6:.2f}M parameters")
    tok = Tokenizer(tokenizer_model or ckpt.get("tokenizer") or "")
    if ckpt.get("tokenizer_sha256") and tok.sha256() != ckpt["tokenizer_sha256"]:
        print(f"warning: {tok.model_path} is not the tokenizer the training data was made with (sha256 differs)")
    if tok.vocab_size != model.args.vocab_size:
        raise SystemExit(f"tokenizer {tok.model_path} has {tok.vocab_size} tokens, the model {model.args.vocab_size}")
    if mode in ("sample", "all"):
        if prompt_file:
            with open(prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        sample(model, tok, prompts, device, autocast_ctx)
    if mode in ("loss", "all"):
        path = val_data or ckpt["config"].get("val_data", "")
        if not path or not os.path.exists(path):
            sys.exit(f"no validation file: pass --val_data (tried {path!r})")
        loss, n = val_loss(model, path, device, autocast_ctx)
        print(f"val loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({n:,} tokens of {path})")
