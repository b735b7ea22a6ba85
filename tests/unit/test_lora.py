"""babyllama/lora.py: a fresh adapter changes nothing, training moves only adapter tensors, merging is exact, and
LoRA on a tied output layer merges (and reloads) to the logits of the adapted model."""
import copy
import dataclasses

from conftest import SMALL_ARGS
import pytest
import torch

from babyllama.generate import generate
from babyllama.hf import hf_config_dict
from babyllama.lora import (LoRALinear, apply_lora, base_state_dict, load_lora_state_dict, lora_parameters,
                            lora_state_dict, merge_lora)
from model import ModelArgs, Transformer

ARGS = ModelArgs(**SMALL_ARGS)  # tied embeddings; shared by every model here (merging must not change it)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return Transformer(ARGS).eval()


def tokens(seed=1):
    return torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def train_adapters(model, x, steps=5):
    """steps of AdamW (lr 1e-2) on the adapters alone, next-token loss on the (B, T) tokens x."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_untrained_adapter_leaves_outputs_unchanged(base):
    x = tokens()
    ref = base(x)[0]
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * ARGS.n_layers
    assert torch.equal(model(x)[0], ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_training_changes_only_adapter_tensors_and_merge_is_exact(base, tmp_path):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, dropout=0.1, targets="wq,wv,w2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    train_adapters(model, tokens(2))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if "lora_" in k}  # every adapter moved, nothing else
    assert base_state_dict(model).keys() == base.state_dict().keys()
    # adapter-only file: base + adapter reloads the same model
    torch.save(lora_state_dict(model), tmp_path / "adapter.pt")
    reloaded = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="wq,wv,w2")
    load_lora_state_dict(reloaded, torch.load(tmp_path / "adapter.pt", weights_only=True))
    model.eval(), reloaded.eval()
    x = tokens(3)
    with torch.no_grad():
        adapted = model(x)[0]
        assert torch.equal(reloaded(x)[0], adapted)
        merged = merge_lora(reloaded)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert merged.state_dict().keys() == base.state_dict().keys()
        assert (merged(x)[0] - adapted).abs().max().item() <= 1e-5
        assert (merged(x)[0] - base(x)[0]).abs().max().item() > 1e-3  # the adapter did something
    # generation reads LoRALinear.weight (the effective weight), so it matches the merged model too
    prompt = tokens(4)[:1, :4]
    assert generate(model, prompt, 6) == generate(merged, prompt, 6)


def test_lora_on_tied_output_merges_and_reloads_to_the_same_logits(base):
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="output,wq")
    train_adapters(model, tokens(1))
    x = tokens(2)
    with torch.no_grad():
        adapted = model(x)[0]
        assert (adapted - base(x)[0]).abs().max().item() > 1e-3  # the adapters did something
        merge_lora(model)
        assert (model(x)[0] - adapted).abs().max().item() <= 1e-5
        # the merged output is no longer the embedding: model.args says so, the shared ARGS is untouched
        assert model.args.tie_embeddings is False and ARGS.tie_embeddings is True
        assert model.output.weight is not model.tok_embeddings.weight
        assert torch.equal(model.tok_embeddings.weight, base.tok_embeddings.weight)
        assert hf_config_dict(model.args)["tie_word_embeddings"] is False
        fresh = Transformer(ModelArgs(**dataclasses.asdict(model.args))).eval()
        fresh.load_state_dict(model.state_dict())
        assert (fresh(x)[0] - adapted).abs().max().item() <= 1e-5


def test_untrained_lora_on_tied_output_merges_back_to_a_tied_model(base):
    model = merge_lora(apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="output"))
    assert model.output.weight is model.tok_embeddings.weight and model.args.tie_embeddings is True
    x = tokens(3)
    with torch.no_grad():
        assert torch.equal(model(x)[0], base(x)[0])


def test_merging_keeps_the_attention_biases():
    """model.py's attention_bias (an imported Qwen2): the merged wq, wk, wv keep their biases."""
    torch.manual_seed(0)
    base = Transformer(dataclasses.replace(ARGS, attention_bias=True)).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 1.0)
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets="wq,wk,wv")
    model.train()
    train_adapters(model, tokens(2))
    model.eval()
    x = tokens(3)
    with torch.no_grad():
        adapted = model(x)[0]
        merged = merge_lora(model)
        assert merged.state_dict().keys() == base.state_dict().keys()
        assert (merged(x)[0] - adapted).abs().max().item() <= 1e-5
