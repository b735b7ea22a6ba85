"""The start and end of a fine-tuning run (sft.py, dpo.py, the RL scripts): the model it trains, from a checkpoint,
with this run's context, dropout and LoRA adapters; and, for LoRA runs, the merged model saved at the end."""
import dataclasses

import torch

from babyllama.checkpoint import load_model, save
from babyllama.lora import apply_lora, load_lora_state_dict, merge_lora
from model import ModelArgs, Transformer


def save_merged(path, model, **fields):
    """LoRA: fold the adapters into the weights (in place: the model is plain afterwards) and save a plain
    checkpoint {"model", **fields} that eval.py, export and serving read like any pretraining checkpoint."""
    merge_lora(model)
    # the merged architecture is the model's own (an adapted output layer unties tied embeddings)
    save(path, {"model": model.state_dict(), **fields, "model_args": dataclasses.asdict(model.args)})


def finetune_model(init_ckpt, resume_ckpt, device, seed, max_seq_len=0, dropout=0.0, lora_rank=0,
                   lora_alpha=16.0, lora_dropout=0.0, lora_targets="wq,wk,wv,wo,w1,w2,w3"):
    """The model a fine-tuning run (sft.py, dpo.py) trains: the weights of init_ckpt (a LoRA checkpoint comes
    back merged) in its architecture with this run's context length (max_seq_len; 0 = the checkpoint's) and
    dropout, LoRA adapters when lora_rank > 0 (seeded: the same initial adapters on every process), and a
    resumed run's weights or adapters (resume_ckpt, a checkpoint dict, or None) on top.
    Returns (model on device, model_args, the starting weights' state dict, the init checkpoint dict)."""
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
