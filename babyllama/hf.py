"""Hugging Face interop: the config and tensor names of LlamaForCausalLM and Qwen2ForCausalLM <-> ModelArgs and ours
(export.py, its tests)."""
import torch

from model import ModelArgs, Transformer, ffn_hidden_dim

# a model with q/k/v biases is a Qwen2 (Hugging Face's Llama puts a bias on o_proj too when it has any)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config")}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_model_type(args: ModelArgs):
    """'qwen2' for a model with attention biases, else 'llama': the key of ARCHITECTURES it is written as."""
    return "qwen2" if args.attention_bias else "llama"


def hf_config_dict(args: ModelArgs):
    """Keyword arguments for the config class of hf_model_type(args) (transformers.LlamaConfig or Qwen2Config)
    describing the same network; rope_scaling as Llama 3.1's config.json spells it."""
    d = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args),
             num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
             num_key_value_heads=args.n_heads if args.n_kv_heads is None else args.n_kv_heads,
             max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
             tie_word_embeddings=args.tie_embeddings, hidden_act="silu", head_dim=args.dim // args.n_heads)
    if args.rope_scaling is not None:
        d["rope_scaling"] = dict(args.rope_scaling)
    if hf_model_type(args) == "qwen2":
        d.update(use_sliding_window=False)  # its q/k/v biases are part of the architecture, not an option
    else:
        d.update(attention_bias=False, mlp_bias=False)
    return d


def rope_args(c, path):
    """(rope_theta, rope_scaling) of config.json c read from path: the older spelling (rope_theta, rope_scaling) or
    transformers 5's rope_parameters. ValueError naming a scaling other than "llama3" or partial rotary."""
    field = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    params = c.get(field) or {}
    theta = float(c.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{path}: {field}={params!r}; partial rotary embeddings are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{path}: {field}={params!r}; only plain RoPE and rope_type 'llama3' are supported")
    missing = [k for k in LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"{path}: {field} lacks {', '.join(missing)} (rope_type 'llama3' needs them)")
    return theta, dict(rope_type="llama3", **{k: params[k] for k in LLAMA3_KEYS})


def model_args_from_hf(c, path):
    """ModelArgs kwargs from config.json c (a dict; path names it in errors) of a LlamaForCausalLM or a
    Qwen2ForCausalLM. ValueError naming the field this model cannot represent."""
    kind = c.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type {kind!r}, only 'llama' (LlamaForCausalLM) and 'qwen2' "
                         f"(Qwen2ForCausalLM) are imported")
    if kind == "llama" and c.get("attention_bias"):
        raise ValueError(f"{path}: attention_bias=true; a Llama with biases on q, k, v and o_proj is not supported "
                         f"(Qwen2's q/k/v biases are)")
    if c.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true; the feed-forward here has no biases")
    if kind == "qwen2" and c.get("use_sliding_window"):
        raise ValueError(f"{path}: use_sliding_window=true; only full attention is supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act={c['hidden_act']!r}; this Llama 2 uses SwiGLU (silu)")
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"{path}: head_dim={c['head_dim']}, not hidden_size / num_attention_heads = {dim // heads}")
    theta, scaling = rope_args(c, path)
    args = dict(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads,
                n_kv_heads=c.get("num_key_value_heads") or heads, vocab_size=c["vocab_size"],
                norm_eps=c.get("rms_norm_eps", 1e-6), max_seq_len=c.get("max_position_embeddings", 2048),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)), rope_theta=theta,
                attention_bias=kind == "qwen2", rope_scaling=scaling)
    if ffn_hidden_dim(ModelArgs(**args)) != c["intermediate_size"]:
        args["hidden_dim"] = c["intermediate_size"]
    return args


HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def to_hf_state_dict(model: Transformer):
    """Our weights (biases too) under LlamaForCausalLM's names, which Qwen2ForCausalLM shares. RoPE is already
    rotate-half, so no permutation."""
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


def fit_vocab(sd, base_size, vocab_size):
    """Our state dict sd with the embedding and output rows cut or grown to vocab_size: the tokenizer's base_size rows
    kept, rows past them (a published model's padding, e.g. Qwen2's 151,936 for 151,665 ids) dropped, rows for the chat
    tokens the Tokenizer appends set to the mean of the kept rows (Hewitt 2021). A new output row's logit is then the
    mean logit, never the largest: greedy decoding is unchanged."""
    out = dict(sd)
    for k in ("tok_embeddings.weight", "output.weight"):
        w = sd[k][:base_size]
        out[k] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab_size - base_size, -1)])
    return out


def from_hf_state_dict(sd):
    """The inverse of to_hf_state_dict: LlamaForCausalLM's (Qwen2ForCausalLM's) names -> ours (tensors not copied).
    Raises KeyError naming a tensor we have no place for."""
    back = {v: k for k, v in HF_NAMES.items()}
    top = {v: k for k, v in HF_TOP.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        parts = k.split(".")  # model.layers.{i}.{self_attn|mlp|..}.{name}.{weight|bias}
        module = ".".join(parts[3:-1])
        if parts[:2] != ["model", "layers"] or module not in back:
            raise KeyError(f"tensor {k!r} has no place in this Llama (another architecture?)")
        out[f"layers.{parts[2]}.{back[module]}.{parts[-1]}"] = v
    return out
