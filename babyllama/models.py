"""Models from checkpoints: any checkpoint this project writes back as a Transformer, the model a fine-tuning run starts
from, and the whole model at its end (gathered from FSDP shards; LoRA adapters merged and saved)."""
import dataclasses
import os

import torch

from babyllama.checkpoint_io import keep_tokenizer, load, save
from babyllama.lora import apply_lora, load_lora_state_dict, merge_lora
from model import ModelArgs, Transformer


def load_model(path, device="cpu", merge=True):
    """A Transformer from any checkpoint this project writes: full ("model") or LoRA (adapters on the base checkpoint it
    names, itself full or LoRA; merged into the weights with merge, else kept as LoRALinear layers). Returns (model on
    device, the checkpoint dict). FileNotFoundError naming a missing file."""
    ckpt = load(path, "cpu")  # the model goes to device; the rest (optimizer state...) stays off the GPU
    if "lora" not in ckpt:
        model = Transformer(ModelArgs(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device), ckpt
    model, _ = load_model(base_path(ckpt, path), device)
    cfg = ckpt["lora_config"]
    apply_lora(model, cfg["rank"], cfg["alpha"], 0.0, cfg["targets"])
    load_lora_state_dict(model, ckpt["lora"])
    if merge:
        merge_lora(model)
    return model.to(device), ckpt



def base_path(ckpt, path):
    """A LoRA checkpoint's base weights: the path it names, or that file name beside it (a moved run folder works)."""
    base = ckpt["base_ckpt"]
    if not os.path.exists(base):
        base = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(base))
    return base



def finetune_model(init_ckpt, resume_ckpt, device, seed, max_seq_len=0, dropout=0.0, lora_rank=0,
                   lora_alpha=16.0, lora_dropout=0.0, lora_targets="wq,wk,wv,wo,w1,w2,w3"):
    """The model a fine-tuning run (sft.py, dpo.py) trains: init_ckpt's weights (LoRA merged) and architecture with this
    run's context length (max_seq_len; 0 = the checkpoint's) and dropout, LoRA adapters when lora_rank > 0 (seeded: the
    same on every process), and resume_ckpt's weights or adapters (a checkpoint dict, or None) on top. Returns (model on
    device, model_args, the starting weights' state dict, the init checkpoint dict)."""
    base, init = load_model(init_ckpt, device)
    base_args = dataclasses.asdict(base.args)  # (a merged LoRA checkpoint may have untied its embeddings)
    model_args = dict(base_args, max_seq_len=max_seq_len or base_args["max_seq_len"], dropout=dropout)
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**model_args))
    start_state = base.state_dict()
    model.load_state_dict(start_state)
    del base
    if resume_ckpt is not None and "model" in resume_ckpt:
        model.load_state_dict(resume_ckpt["model"])
    if lora_rank:
        apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
        if resume_ckpt is not None and "lora" in resume_ckpt:  # (a DCP checkpoint loads in training_optimizer)
            load_lora_state_dict(model, resume_ckpt["lora"])
    return model.to(device), model_args, start_state, init



def frozen_copy(model_args, state_dict, device):
    """The reference: a Transformer with the given weights, in eval mode, requiring no gradient. Built without touching
    the RNG, so a resumed run's dropout masks stay those of an uninterrupted run."""
    with torch.random.fork_rng(devices=[]):
        ref = Transformer(ModelArgs(**dict(model_args, dropout=0.0)))
    ref.load_state_dict(state_dict)
    ref.requires_grad_(False)
    return ref.eval().to(device)


def save_merged(path, model, **fields):
    """LoRA: fold the adapters into the weights (in place) and save a plain checkpoint {"model", **fields} that eval.py,
    export and serving read like a pretraining one, with the recorded tokenizer copied beside it (keep_tokenizer)."""
    merge_lora(model)
    if fields.get("tokenizer"):
        keep_tokenizer(path, fields["tokenizer"], fields.get("tokenizer_sha256", ""))
    # the merged architecture is the model's own (an adapted output layer unties tied embeddings)
    save(path, {"model": model.state_dict(), **fields, "model_args": dataclasses.asdict(model.args)})



def gathered_model(model, run):
    """The trained model as a plain Transformer with all its weights on the master (for generation and the merged LoRA
    file), None elsewhere. Under FSDP a collective gathering the shards into a new CPU model; else the model itself."""
    if run.parallel != "fsdp":
        return model if run.master else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # slow to import
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.master:
        return None
    plain = Transformer(model.args)
    if getattr(model, "lora_config", None):
        cfg = model.lora_config
        apply_lora(plain, cfg["rank"], cfg["alpha"], cfg["dropout"], cfg["targets"])
    plain.load_state_dict(state)
    return plain
