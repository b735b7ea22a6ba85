"""babyllama/hf.py, Hugging Face's names and config: our weights under LlamaForCausalLM's (Qwen2ForCausalLM's) names
fill a model built from hf_config_dict exactly (strict loading: every name and shape, none missing or left over),
the names map back to ours, and a tensor with no place in this Llama 2 is refused by name; the config transformers
writes for ours reads back as the same ModelArgs, Llama 3.1's older config.json spelling reads as transformers 5's,
and what model.py cannot represent is refused naming the field. (That the logits then agree:
tests/unit/test_model.py; export.py's folders and files: tests/scripts/test_export.py.)"""
from dataclasses import replace
import json

from conftest import tiny_model
import pytest
import torch

from babyllama.hf import ARCHITECTURES, from_hf_state_dict, hf_config_dict, hf_model_type, model_args_from_hf, \
    to_hf_state_dict
from model import ModelArgs, ffn_hidden_dim

transformers = pytest.importorskip("transformers")


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
SHAPES = {"tied_gqa": dict(), "untied_mqa_multiplier": dict(n_kv_heads=1, tie_embeddings=False, ffn_dim_multiplier=1.3),
          "llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, tie_embeddings=False),
          "qwen2_tied": dict(attention_bias=True, rope_theta=1e6),
          "qwen2_untied": dict(attention_bias=True, tie_embeddings=False, n_kv_heads=1)}


def hf_twin(args):
    """The transformers model (random weights) of the architecture hf.py names for args."""
    architecture, config_class = ARCHITECTURES[hf_model_type(args)]
    return getattr(transformers, architecture)(getattr(transformers, config_class)(**hf_config_dict(args)))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_our_names_fill_llama_for_causal_lm_exactly_and_map_back(shape):
    model = tiny_model(0, **SHAPES[shape])
    sd = to_hf_state_dict(model)
    hf = hf_twin(model.args)
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if "qwen2" in shape else "LlamaForCausalLM")
    result = hf.load_state_dict(sd, strict=True)  # raises on a missing or unexpected name, or a wrong shape
    assert not result.missing_keys and not result.unexpected_keys
    back = from_hf_state_dict(sd)
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.experts.0.gate_proj.weight",  # a mixture of experts
                                  "model.layers.0.self_attn.q_norm.weight",  # a norm of the queries (Qwen 3)
                                  "model.rotary_emb.inv_freq"])  # outside the layers and not a top-level tensor
def test_a_tensor_with_no_place_is_refused_by_name(name):
    sd = dict(to_hf_state_dict(tiny_model(0)), **{name: torch.zeros(8)})
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        from_hf_state_dict(sd)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_config_transformers_writes_reads_back_as_the_same_model_args(shape, tmp_path):
    args = tiny_model(0, **SHAPES[shape]).args
    hf_twin(args).config.save_pretrained(str(tmp_path))  # config.json as transformers writes it
    c = json.loads((tmp_path / "config.json").read_text())
    got = ModelArgs(**model_args_from_hf(c, "config.json"))
    # multiple_of and ffn_dim_multiplier are not in a Hugging Face config: the width comes back (as hidden_dim)
    assert ffn_hidden_dim(got) == ffn_hidden_dim(args)
    width = dict(multiple_of=0, ffn_dim_multiplier=None, hidden_dim=0)
    assert replace(got, **width) == replace(args, **width)


def test_llama_3_1s_config_json_spelling_reads_like_transformers_5s():
    # Llama-3.2-1B's config.json as published (transformers 4.x): rope_theta and rope_scaling at the top
    old = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 128, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 128, "tie_word_embeddings": True, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    new = transformers.LlamaConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    assert "rope_parameters" in new and not new.get("rope_scaling")  # transformers 5 moved them
    a, b = model_args_from_hf(old, "old.json"), model_args_from_hf(new, "new.json")
    assert a == b and a["rope_theta"] == 500000.0 and a["rope_scaling"]["factor"] == 32.0


BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 128}


@pytest.mark.parametrize("change,message", [
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=true"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling=.*only plain RoPE and rope_type 'llama3'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_parameters="),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling lacks low_freq_factor"),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "rope_parameters=.*partial rotary"),
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=32), "head_dim=32"),
])
def test_what_model_py_cannot_represent_is_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match="x/config.json: " + message):
        model_args_from_hf(dict(BASE, **change), "x/config.json")
