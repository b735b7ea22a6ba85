"""Hugging Face interop: LlamaConfig's arguments and the tensor names of LlamaForCausalLM (export.py, its tests)."""
from model import ModelArgs, Transformer, ffn_hidden_dim


def hf_config_dict(args: ModelArgs):
    """Keyword arguments for transformers.LlamaConfig describing the same network."""
    return dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args),
                num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                num_key_value_heads=args.n_heads if args.n_kv_heads is None else args.n_kv_heads,
                max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                tie_word_embeddings=args.tie_embeddings, hidden_act="silu", attention_bias=False,
                mlp_bias=False, head_dim=args.dim // args.n_heads)


HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def to_hf_state_dict(model: Transformer):
    """Our weights under LlamaForCausalLM's names. RoPE is already rotate-half, so no permutation."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            module, param = rest.rsplit(".", 1)
            k = f"model.layers.{i}.{HF_NAMES[module]}.{param}"
        else:
            k = HF_TOP[k]
        sd[k] = v.detach().clone()
    return sd


def from_hf_state_dict(sd):
    """The inverse of to_hf_state_dict: LlamaForCausalLM's names -> ours (tensors not copied). Raises KeyError
    naming a tensor we have no place for."""
    back = {v: k for k, v in HF_NAMES.items()}
    top = {v: k for k, v in HF_TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        parts = k.split(".")  # model.layers.{i}.{self_attn|mlp|..}.{name}.weight
        module = ".".join(parts[3:-1])
        if parts[:2] != ["model", "layers"] or module not in back:
            raise KeyError(f"tensor {k!r} has no place in this Llama 2 (a bias, or another architecture?)")
        out[f"layers.{parts[2]}.{back[module]}.{parts[-1]}"] = v
    return out
