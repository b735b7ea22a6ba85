"""babyllama/hf.py, Hugging Face's names and config: our weights under LlamaForCausalLM's names fill a model built
from hf_config_dict exactly (strict loading: every name and shape, none missing or left over), the names map
back to ours, and a tensor with no place in this Llama 2 is refused by name. (That the logits then agree:
tests/unit/test_model.py; export.py's folders and files: tests/scripts/test_export.py.)"""
from conftest import tiny_model
import pytest
import torch

from babyllama.hf import from_hf_state_dict, hf_config_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("shape", [dict(), dict(n_kv_heads=1, tie_embeddings=False, ffn_dim_multiplier=1.3)],
                         ids=["tied_gqa", "untied_mqa_multiplier"])
def test_our_names_fill_llama_for_causal_lm_exactly_and_map_back(shape):
    model = tiny_model(0, **shape)
    sd = to_hf_state_dict(model)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(model.args)))
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
