"""Models for the export tests (tests/scripts/test_export.py, test_export_gguf.py): ours with no weight left at its
init, and Hugging Face folders made by transformers with random weights and a tokenizer of any kind."""
import copy

import torch

from conftest import spread_weights_, tiny_model
from tokenizer import Tokenizer
from tokenizer_files import copy_tokenizer


def random_model(tok, seed=0, **kw):
    """A tiny model for tok's vocabulary (48 wide, multi-head attention unless kw say otherwise) with no weight
    left at its init, norms included."""
    args = dict(dim=48, n_kv_heads=None, vocab_size=tok.vocab_size)
    return spread_weights_(tiny_model(seed, **dict(args, **kw)), seed, std=0.2).eval()


# Hugging Face models made by transformers with random weights: the Llama 2 shape (multi-head, theta 10,000,
# untied), the Llama 3 shape (GQA, theta 500,000, llama3 RoPE scaling whose original context of 64 puts the
# 16-wide heads' frequencies in all three bands, tied as Llama 3.2) and Qwen2's (q/k/v biases, tied)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
HF_SHAPES = {"llama2": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
             "llama3": ("Llama", dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                                      tie_word_embeddings=True)),
             "qwen2": ("Qwen2", dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True))}


def hf_random_folder(tok_path, shape, folder, seed=1, pad=0):
    """A Hugging Face folder of HF_SHAPES[shape] with N(0, 0.2) weights (biases and norms too) set by transformers,
    and the tokenizer at tok_path (conftest.copy_tokenizer); vocab_size its own ids plus pad rows (a published
    model's padding). Returns the transformers model."""
    import transformers
    kind, extra = HF_SHAPES[shape]
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=Tokenizer(tok_path).base_size + pad, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6, **copy.deepcopy(extra))
    torch.manual_seed(seed)
    hf = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(folder))
    copy_tokenizer(tok_path, str(folder))
    return hf
