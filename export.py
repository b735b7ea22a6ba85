"""
Take a model out of this project as a Hugging Face folder, a GGUF file or one checkpoint file, or bring a Hugging
Face Llama or Qwen2 folder in.

    python export.py --ckpt_path=out/demo/sft/ckpt.pt --out_dir=out/demo/hf                 # fp32
    python export.py --ckpt_path=out/demo/sft/ckpt.pt --out_dir=out/demo/hf_bf16 --dtype=bfloat16
    python export.py --import_from=path/to/llama_folder --out_dir=out/imported             # -> out/imported/ckpt.pt
    python export.py --format=gguf --ckpt_path=out/demo/sft/ckpt.pt --out_dir=out/demo/gguf --dtype=q8_0
    python export.py --format=pt --ckpt_path=out/x/ckpt.dcp --out_dir=out/x                # -> out/x/model.pt

The folder (any checkpoint this project writes: pretrained, SFT, DPO; LoRA adapters merged first) holds
  config.json             LlamaConfig of the same network (babyllama/hf.py), architectures LlamaForCausalLM; a
                          model with attention biases (an imported Qwen2) as Qwen2Config, Qwen2ForCausalLM
  model.safetensors       the weights under LlamaForCausalLM's names, in --dtype (float32, bfloat16, float16);
                          a tied output layer is stored once, as the embedding
  generation_config.json  eos and <|end|> as stop tokens, eval.py's sampling defaults
  tokenizer.json          the tokenizer for transformers (tokenizer/formats.py): a sentencepiece model (ours,
                          Llama 2's, ChatGLM2's) as a byte-fallback BPE that cuts and merges as sentencepiece
                          does; a byte-level BPE as it came; with the chat tokens we appended
  tokenizer.model         the sentencepiece model itself, for a sentencepiece kind
  tokenizer_config.json   the special tokens and the chat template in Jinja, so that
                          apply_chat_template(messages, add_generation_prompt=True) gives the ids of
                          tokenizer/chat_template.encode_prompt
and loads offline: AutoModelForCausalLM.from_pretrained(dir), AutoTokenizer.from_pretrained(dir). The export
checks that AutoTokenizer encodes a probe text to our ids before it puts the folder in place (transformers 5 gives
every qwen2 folder its Qwen2Tokenizer: a Qwen2 with another tokenizer is refused there).

Two differences from our Tokenizer, both in text that contains what our wrapper escapes: Hugging Face's tokenizer
reads a literal "<|user|>" (or any chat marker) in the text as the control token, where ours encodes the
characters, and (our own kind) a literal "▁" as a space. Keep user text free of the markers (a server should) if
the ids must agree.

GGUF (--format=gguf; --dtype float32, float16 or q8_0): one file, <out_dir>/model-<dtype>.gguf, for llama.cpp,
llama-cpp-python and Ollama, written with the `gguf` package llama.cpp publishes: the "llama" architecture's
hyperparameters ("qwen2" for a model with q/k/v biases: their tensors too, and no reordering below, its RoPE is
rotate-half as ours), the tokenizer (tokenizer/formats.py: "llama" for sentencepiece pieces, scores and types, the
space prefix only for a dummy-prefix model; "gpt2" for byte-level BPE, its merges and the pre-tokenizer named; no
bos or eos added), the chat template, and the tensors under llama.cpp's names. llama.cpp's "llama" RoPE
rotates interleaved pairs of a head's dimensions where ours (Hugging Face's layout) rotates its two halves
against each other, so the rows of wq and wk are reordered per head (gguf_rope_rows); attention scores do not
change. Norm weights stay float32; q8_0 (blocks of 32 weights, one fp16 scale each) applies to matrices whose
rows are a multiple of 32 long, the others stay float32.

One file (--format=pt): the sharded checkpoint of an FSDP run (its ckpt.dcp folder) as the single-file
checkpoint dict (<out_dir>/model.pt) a one-process run writes, without the optimizer state
(sharded.consolidate); eval.py, export.py and --init_ckpt read the folder too, this is for a file to copy.

Import: config.json + model.safetensors (or sharded *.safetensors with an index) + the tokenizer (tokenizer.model,
or tokenizer.json + tokenizer_config.json) of a LlamaForCausalLM (Llama 2 or Llama 3 shape: GQA, any rope_theta,
"llama3" RoPE scaling) or a Qwen2ForCausalLM (q/k/v biases, tied or untied embeddings) becomes out_dir/ckpt.pt and
the tokenizer beside it, which eval.py reads and pretrain.py / sft.py / dpo.py start from (--init_ckpt). The
vocabulary becomes the tokenizer's: padding rows past it are dropped, the chat tokens appended to it get rows set to
the mean embedding (babyllama/hf.fit_vocab). What model.py cannot represent is refused with the field named
(babyllama/hf.py): a Llama's attention or MLP biases, another RoPE scaling, sliding-window attention, another
activation or head_dim, a tokenizer that cannot keep its kind's round-trip promise (tokenizer/tokenizer.py). GGUF
export of a model with RoPE scaling is refused (ValueError, no file written): the GGUF written here does not carry
it.
"""
import json
import os
import shutil
import time

import numpy as np
import torch

from babyllama import checkpoint_io, models
from babyllama.atomic import atomic_path
from babyllama.configurator import run_main
from babyllama.hf import (ARCHITECTURES, fit_vocab, from_hf_state_dict, hf_config_dict, hf_model_type,
                          model_args_from_hf, to_hf_state_dict)
from babyllama.inference import load_for_inference
from model import ModelArgs, Transformer, ffn_hidden_dim
from tokenizer import Tokenizer
from tokenizer.formats import add_gguf_vocab, tokenizer_json

# -----------------------------------------------------------------------------------------------------------
ckpt_path = "out/pretrain/ckpt.pt"  # export: the checkpoint (full or LoRA)
tokenizer_model = ""  # export: "" = the tokenizer the checkpoint records, or its copy beside the checkpoint
out_dir = "out/hf"  # export: the Hugging Face folder (gguf, pt: the file's folder); import: where ckpt.pt goes
format = "hf"  # export format: 'hf' (a Hugging Face folder), 'gguf' (a llama.cpp file) or 'pt' (one checkpoint file)
dtype = "float32"  # export: weights in float32, bfloat16 or float16 (hf); float32, float16 or q8_0 (gguf)
import_from = ""  # a Hugging Face Llama or Qwen2 folder to import instead of exporting
overwrite = False  # replace an existing out_dir
# -----------------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the chat template of tokenizer/chat_template.py in Jinja: every message, the system prompt included, is
# <|role|>content<|end|>; the generation prompt is <|assistant|>; no bos
CHAT_TEMPLATE = ("{%- for message in messages -%}"
                 "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")
# what the export's tokenizer check encodes: Chinese, English, spaces, tabs, newlines, full-width, emoji, digits
PROBE = "床前明月光，疑是地上霜。\n  Hello, world!\t12345 ＡＢ😀 答案：A"


def tokenizer_config(tok, max_seq_len):
    """tokenizer_config.json: the fast tokenizer of tokenizer.json (whatever kind), no bos/eos added, the special
    tokens by name, the chat template."""
    name = lambda i: tok.id_to_piece(i) if i is not None and i >= 0 else None
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "unk_token": name(tok.unk_id),
            "pad_token": name(tok.pad_id), "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE}


def write_tokenizer(tok, folder, max_seq_len):
    """tokenizer.json (tokenizer/formats.py), tokenizer_config.json and, for a sentencepiece kind, tokenizer.model.
    Raises ValueError when AutoTokenizer does not encode PROBE to our ids from the folder."""
    from transformers import AutoTokenizer
    if tok.sp is not None:
        shutil.copyfile(tok.model_path, os.path.join(folder, "tokenizer.model"))
    tokenizer_json(tok).save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok, max_seq_len), f, ensure_ascii=False, indent=1)
    again = AutoTokenizer.from_pretrained(folder)
    if again.encode(PROBE, add_special_tokens=False) != tok.encode(PROBE):
        # transformers 5 loads every qwen2 folder's tokenizer as its Qwen2Tokenizer (Qwen2's pre-tokenizer and NFC),
        # whatever tokenizer_config.json says: a Qwen2 model with another tokenizer stops here
        raise ValueError(f"{tok.model_path}: the Hugging Face tokenizer of the folder ({type(again).__name__}, "
                         f"as AutoTokenizer loads it) encodes text differently from ours; not exporting a model "
                         f"that would read other ids")


def given(token_id):
    """A Tokenizer's special id, None for the -1 of one the tokenizer lacks (Llama 2 has no pad, minimind no bos)."""
    return token_id if token_id is not None and token_id >= 0 else None


def generation_config(tok, max_seq_len):
    """generation_config.json: stop on eos and on end-of-turn; eval.py's sampling defaults."""
    from transformers import GenerationConfig
    stops = [i for i in (tok.eos_id, tok.end_id) if i is not None]
    return GenerationConfig(bos_token_id=given(tok.bos_id), eos_token_id=stops, pad_token_id=given(tok.pad_id),
                            do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, max_length=max_seq_len)


def export_hf(model, tok, folder, dtype_name="float32"):
    """Write the Hugging Face folder of model (a Transformer) and tok (our Tokenizer) into folder (created;
    what is there is replaced). See the module docstring for the files. ValueError from write_tokenizer."""
    write_hf_model(model, tok, folder, dtype_name)
    write_tokenizer(tok, folder, model.args.max_seq_len)


def write_hf_model(model, tok, folder, dtype_name="float32"):
    """The model's files of the Hugging Face folder (config.json, model.safetensors, generation_config.json) in folder
    (created); tok gives the special ids."""
    from safetensors.torch import save_file
    import transformers
    args = model.args
    os.makedirs(folder, exist_ok=True)
    architecture, config_class = ARCHITECTURES[hf_model_type(args)]
    cfg = getattr(transformers, config_class)(**hf_config_dict(args), bos_token_id=given(tok.bos_id),
                                              eos_token_id=tok.eos_id, pad_token_id=given(tok.pad_id),
                                              architectures=[architecture], dtype=dtype_name)
    cfg.save_pretrained(folder)
    sd = to_hf_state_dict(model)
    if args.tie_embeddings:
        del sd["lm_head.weight"]  # the same tensor as the embedding; transformers ties it back on load
    sd = {k: v.to(DTYPES[dtype_name]).contiguous() for k, v in sd.items()}
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(folder, "model.safetensors"), 0o644)  # readable like the other files
    generation_config(tok, args.max_seq_len).save_pretrained(folder)


GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
GGUF_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}
GGUF_DTYPES = ("float32", "float16", "q8_0")


def gguf_name(name):
    """llama.cpp's name of one of our tensors (layers.3.attention.wq.weight -> blk.3.attn_q.weight)."""
    if name in GGUF_TOP:
        return GGUF_TOP[name]
    _, i, rest = name.split(".", 2)
    module, param = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[module]}.{param}"


def gguf_rope_rows(w, n_heads):
    """wq or wk (n_heads * hd, D) with each head's rows reordered from the rotate-half layout (row i pairs with
    row i + hd/2) to the interleaved one llama.cpp's "llama" RoPE reads (row 2i pairs with row 2i + 1): new row
    2i = old row i, new row 2i + 1 = old row hd/2 + i. The same reordering of queries and keys leaves every
    q . k unchanged."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def export_gguf(model, tok, path, dtype_name="float32"):
    """Write model (a Transformer) and tok as one GGUF file at path, tensors in dtype_name (GGUF_DTYPES): llama.cpp's
    "qwen2" architecture for a model with q/k/v biases (whose RoPE is rotate-half, as ours), else "llama".
    ValueError, before anything is written, for RoPE scaling, which neither carries here."""
    import gguf
    args = model.args
    if args.rope_scaling is not None:
        raise ValueError(f"GGUF export of a model with rope_scaling={args.rope_scaling!r} is not supported; export it "
                         f"as a Hugging Face folder (--format=hf)")
    arch = hf_model_type(args)
    n_kv = args.n_kv_heads or args.n_heads
    kinds = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(ffn_hidden_dim(args))
    w.add_rope_dimension_count(args.dim // args.n_heads)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(kinds[dtype_name])
    add_gguf_vocab(w, tok)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # llama.cpp reads token_embd when there is no output tensor
        t = t.detach().float()
        if arch == "llama" and name.endswith("attention.wq.weight"):
            t = gguf_rope_rows(t, args.n_heads)
        elif arch == "llama" and name.endswith("attention.wk.weight"):
            t = gguf_rope_rows(t, n_kv)
        a = t.numpy()
        if a.ndim == 1 or dtype_name == "float32" or (dtype_name == "q8_0" and a.shape[-1] % 32):
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif dtype_name == "float16":
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            q = gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_hf_config(folder):
    """ModelArgs kwargs from a Hugging Face Llama or Qwen2 config.json. Raises ValueError naming the field model.py
    cannot represent."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        return model_args_from_hf(json.load(f), path)


def read_hf_weights(folder):
    """The tensors of model.safetensors, or of every shard named by model.safetensors.index.json."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"{folder}: no {name} (want safetensors weights; .bin pickles are not read)")
        sd.update(load_file(path))
    return sd


def chat_rows_named(folder, tok):
    """Whether folder's tokenizer.json names the chat tokens tok appends at the same ids (a folder export.py wrote):
    their rows are then trained ones, not a published model's padding that happens to be as long."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
    return all(added.get(t) == i for t, i in tok.special.items() if i >= tok.base_size)


def import_hf(folder, out):
    """A Hugging Face Llama or Qwen2 folder -> (Transformer in fp32, Tokenizer copied into out). The vocabulary becomes
    the tokenizer's (hf.fit_vocab). Raises ValueError naming what cannot be represented."""
    args = read_hf_config(folder)
    try:
        src = Tokenizer(folder)  # checked before anything is written; ValueError for one that breaks its promise
    except FileNotFoundError:
        raise ValueError(f"{folder}: no tokenizer.model (sentencepiece) or tokenizer.json (byte-level BPE)") from None
    if args["vocab_size"] < src.base_size:
        raise ValueError(f"{folder}: vocab_size {args['vocab_size']} in config.json, but its tokenizer has "
                         f"{src.base_size} ids")
    sd = from_hf_state_dict(read_hf_weights(folder))
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(checkpoint_io.keep_tokenizer(os.path.join(out, "ckpt.pt"), folder))  # with tokenizer_config.json
    if args["tie_embeddings"]:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    if args["vocab_size"] != tok.vocab_size or (tok.vocab_size > tok.base_size and not chat_rows_named(folder, tok)):
        print(f"vocabulary {args['vocab_size']} (config.json) -> {tok.vocab_size} (the tokenizer's "
              f"{tok.base_size} ids and {tok.vocab_size - tok.base_size} appended chat tokens)")
        sd, args["vocab_size"] = fit_vocab(sd, tok.base_size, tok.vocab_size), tok.vocab_size
    model = Transformer(ModelArgs(**args))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model, tok


def main():
    t0 = time.time()
    target = out_dir  # what must not exist yet: the folder (hf, import) or the file in it (gguf, pt)
    if format == "gguf" and not import_from:
        target = os.path.join(out_dir, f"model-{dtype}.gguf")
    elif format == "pt" and not import_from:
        target = os.path.join(out_dir, "model.pt")
    if os.path.exists(target) and (os.path.isfile(target) or os.listdir(target)) and not overwrite:
        raise SystemExit(f"{target} exists: pass --overwrite=True or another --out_dir")
    if import_from:
        model, tok = import_hf(import_from, out_dir)
        path = os.path.join(out_dir, "ckpt.pt")
        models.save_merged(path, model, iter_num=0, config={"import_from": os.path.abspath(import_from)},
                       tokenizer=tok.model_path, tokenizer_sha256=tok.sha256())
        print(f"{import_from} -> {path} ({model.num_params() / 1e6:.2f}M parameters) and {tok.model_path} in "
              f"{time.time() - t0:.1f} s")
        return
    if format not in ("hf", "gguf", "pt"):
        raise SystemExit(f"format must be 'hf', 'gguf' or 'pt', not {format!r}")
    if format == "pt":
        if not os.path.isdir(ckpt_path):
            raise SystemExit(f"--format=pt writes the sharded checkpoint of an FSDP run (its .dcp folder) as one file; "
                             f"{ckpt_path} is not one")
        os.makedirs(out_dir, exist_ok=True)
        checkpoint_io.save(target, checkpoint_io.load(ckpt_path))  # a .dcp folder loads as the one-file dict (sharded.consolidate)
        print(f"{ckpt_path} -> {target} (one checkpoint file; {os.path.getsize(target) / 2**20:.1f} MiB) in "
              f"{time.time() - t0:.1f} s")
        return
    allowed = DTYPES if format == "hf" else GGUF_DTYPES
    if dtype not in allowed:
        raise SystemExit(f"dtype must be one of {', '.join(allowed)} for {format}, not {dtype!r}")
    model, tok, _, _, _ = load_for_inference(ckpt_path, "cpu", "float32", tokenizer_model)  # LoRA merged
    if format == "gguf":
        path = target
        with atomic_path(path) as tmp_file:
            export_gguf(model, tok, tmp_file, dtype)
        print(f"{ckpt_path} -> {path} (llama.cpp GGUF, {dtype}; {os.path.getsize(path) / 2**20:.1f} MiB) in "
              f"{time.time() - t0:.1f} s")
        return
    tmp = out_dir.rstrip("/") + f".tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_hf(model, tok, tmp, dtype)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)  # the whole folder appears at once
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    architecture = ARCHITECTURES[hf_model_type(model.args)][0]
    print(f"{ckpt_path} -> {out_dir} ({architecture}, {dtype}; {model.num_params() / 1e6:.2f}M parameters) in "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(globals(), main)
