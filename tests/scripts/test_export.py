"""export.py: a Hugging Face folder that transformers loads offline and that computes our logits, greedy text and
chat-template ids; import of Hugging Face Llama and Qwen2 folders with their own tokenizers of every kind; export
then import is the identity; what import refuses; a LoRA checkpoint exported merged; a sharded checkpoint made one
file. GGUF: test_export_gguf.py; the tensor names themselves: tests/unit/test_hf.py."""
from dataclasses import replace
import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from babyllama.checkpoint_io import save
from babyllama.generate import generate
from babyllama.lora import apply_lora, lora_parameters, lora_state_dict
from babyllama.models import load_model, save_merged
from conftest import run_script, write_motif_bins
from export import export_hf, import_hf, write_hf_model, write_tokenizer
from hf_models import HF_SHAPES, LLAMA3_SCALING, hf_random_folder, random_model
from model import ModelArgs, ffn_hidden_dim
from tokenizer import Tokenizer
from tokenizer.chat_template import encode_prompt
from tokenizer_files import HOSTILE, spells_a_special

transformers = pytest.importorskip("transformers")


def load_hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


SHAPES = {"base": {}, "gqa": dict(n_kv_heads=2), "untied": dict(tie_embeddings=False),
          "untied_gqa_multiplier_theta": dict(tie_embeddings=False, n_kv_heads=1, ffn_dim_multiplier=1.3,
                                              rope_theta=500.0)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exported_folder_gives_our_logits_and_greedy_text(tiny_tok, tmp_path, shape):
    model = random_model(tiny_tok, **SHAPES[shape])
    export_hf(model, tiny_tok, str(tmp_path / "hf"))
    hf, _ = load_hf(str(tmp_path / "hf"))
    ids = torch.tensor([tiny_tok.encode("床前明月光，疑是地上霜。举头望明月，")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= 1e-4
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                             min_new_tokens=12)[0, ids.shape[1]:].tolist()
    assert theirs == generate(model, ids, 12, temperature=0.0)[0]


def test_bf16_export_stores_bf16_weights(tiny_tok, tmp_path):
    from safetensors import safe_open
    export_hf(random_model(tiny_tok), tiny_tok, str(tmp_path / "hf"), "bfloat16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


CONVERSATIONS = [
    (None, [{"role": "user", "content": "请写一首题为《静夜思》的诗。"}]),
    ("你是一位熟读古典诗词的助手。", [{"role": "user", "content": "《静夜思》的作者是谁？"},
                                      {"role": "assistant", "content": "《静夜思》的作者是李白。"},
                                      {"role": "user", "content": " What is two plus two?\n\tIt is four. "}]),
]


@pytest.mark.parametrize("use_fast", [True, False])
def test_apply_chat_template_gives_our_prompt_ids(tiny_tok, tmp_path, use_fast):
    export_hf(random_model(tiny_tok), tiny_tok, str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                        use_fast=use_fast)
    for system, msgs in CONVERSATIONS:
        full = ([{"role": "system", "content": system}] if system else []) + msgs
        ids = hf_tok.apply_chat_template(full, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == encode_prompt(tiny_tok, msgs, system)
    assert hf_tok.decode(tiny_tok.encode("床前明月光 a\tb")) == "床前明月光 a\tb"


def test_import_gives_the_logits_of_transformers(tiny_tok, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=64, intermediate_size=100,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(tmp_path / "src"))
    (tmp_path / "src" / "tokenizer.model").write_bytes(open(tiny_tok.model_path, "rb").read())
    model, _ = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    assert model.args.hidden_dim == 100 and model.args.n_kv_heads == 2  # a width the multiple_of rule cannot give
    ids = torch.tensor([tiny_tok.encode("白日依山尽，黄河入海流。")])
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4


def test_export_then_import_is_the_identity_on_weights_and_tokenizer(tiny_tok, tmp_path):
    model = random_model(tiny_tok, n_kv_heads=2, tie_embeddings=False)
    save_merged(str(tmp_path / "ckpt.pt"), model, iter_num=3, config={}, tokenizer=tiny_tok.model_path,
                tokenizer_sha256=tiny_tok.sha256())
    run_script("export.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'hf'}")
    run_script("export.py", f"--import_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}")
    back = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)
    theirs, ours = back["model"], model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert open(tmp_path / "back" / "tokenizer.model", "rb").read() == open(tiny_tok.model_path, "rb").read()
    assert back["tokenizer_sha256"] == tiny_tok.sha256()


@pytest.mark.parametrize("field,value,message", [
    ("attention_bias", True, "attention_bias=true; a Llama with biases on q, k, v and o_proj is not supported"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("model_type", "mistral", "model_type 'mistral'"),
])
def test_import_refuses_what_it_cannot_represent_naming_the_field(tiny_tok, tmp_path, field, value, message):
    export_hf(random_model(tiny_tok), tiny_tok, str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_imported_hf_models_give_transformers_logits_and_greedy_tokens(tiny_tok, tmp_path, shape):
    hf = hf_random_folder(tiny_tok.model_path, shape, tmp_path / "src")
    model, _ = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    assert model.args.attention_bias == (shape == "qwen2")
    assert model.args.rope_scaling == (LLAMA3_SCALING if shape == "llama3" else None)
    ids = torch.tensor([tiny_tok.encode("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")])
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                             min_new_tokens=12)[0, ids.shape[1]:].tolist()
    assert theirs == generate(model, ids, 12, temperature=0.0)[0]  # the KV-cache path with stacked [wq; wk; wv]


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_hf_import_then_export_gives_back_the_weights_and_config(tiny_tok, tmp_path, shape):
    """The model's files (a Qwen2 folder's sentencepiece tokenizer is refused: the next test)."""
    from safetensors.torch import load_file
    hf_random_folder(tiny_tok.model_path, shape, tmp_path / "src")
    model, tok = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    write_hf_model(model, tok, str(tmp_path / "back"))
    src, back = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("src", "back"))
    assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)
    src_cfg, back_cfg = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "back"))
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")  # the export writes the tokenizer's, the source has none
    for k in src_cfg.keys() - {"transformers_version", *ids}:
        assert back_cfg[k] == src_cfg[k], k
    assert back_cfg["architectures"] == [f"{HF_SHAPES[shape][0]}ForCausalLM"]


def test_a_qwen2_export_with_a_sentencepiece_tokenizer_is_refused_by_name(tiny_tok, tmp_path):
    model = random_model(tiny_tok, attention_bias=True)
    with pytest.raises(ValueError, match="Qwen2Tokenizer, as AutoTokenizer loads it"):
        export_hf(model, tiny_tok, str(tmp_path / "hf"))
    save_merged(str(tmp_path / "ckpt.pt"), model, iter_num=0, config={}, tokenizer=tiny_tok.model_path,
                tokenizer_sha256=tiny_tok.sha256())
    p = run_script("export.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'out'}", check=False)
    assert p.returncode == 1 and "Qwen2Tokenizer" in p.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "hf", "tok.model"]  # no folder left (the copy of save_merged)


@pytest.mark.parametrize("shape", [dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, n_kv_heads=1),
                                   dict(attention_bias=True, rope_theta=1e6, n_kv_heads=2),
                                   dict(attention_bias=True, tie_embeddings=False, n_kv_heads=2)],
                         ids=["llama3", "qwen2_tied", "qwen2_untied"])
def test_export_then_import_of_llama3_and_qwen2_shapes_is_the_identity(tiny_tok, tmp_path, shape):
    model = random_model(tiny_tok, dim=64, **shape)
    if model.args.attention_bias:  # the model's files, and the tokenizer.model the import reads
        write_hf_model(model, tiny_tok, str(tmp_path / "hf"))
        (tmp_path / "hf" / "tokenizer.model").write_bytes(open(tiny_tok.model_path, "rb").read())
    else:
        save_merged(str(tmp_path / "ckpt.pt"), model, iter_num=3, config={}, tokenizer=tiny_tok.model_path,
                    tokenizer_sha256=tiny_tok.sha256())
        run_script("export.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'hf'}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if model.args.attention_bias else "LlamaForCausalLM")
    ids = torch.tensor([tiny_tok.encode("床前明月光，疑是地上霜。举头望明月，")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= 1e-4
    if model.args.attention_bias:  # in this process (the command line: the llama3 case)
        back, _ = import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
        theirs, args = back.state_dict(), back.args
    else:
        run_script("export.py", f"--import_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}")
        back = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)
        theirs, args = back["model"], ModelArgs(**back["model_args"])
    ours = model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert ffn_hidden_dim(args) == ffn_hidden_dim(model.args)  # the width comes back as hidden_dim
    width = dict(multiple_of=0, ffn_dim_multiplier=None, hidden_dim=0)
    assert replace(args, **width) == replace(model.args, **width)


def test_import_refuses_a_folder_without_a_tokenizer_or_with_a_smaller_vocabulary(tiny_tok, tmp_path):
    export_hf(random_model(tiny_tok), tiny_tok, str(tmp_path / "hf"))
    for name in ("tokenizer.model", "tokenizer.json"):
        os.remove(tmp_path / "hf" / name)
    with pytest.raises(ValueError, match="no tokenizer.model \\(sentencepiece\\) or tokenizer.json"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    p = run_script("export.py", f"--import_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out2'}", check=False)
    assert p.returncode == 1 and "no tokenizer.model (sentencepiece) or tokenizer.json" in p.stderr
    shutil.copyfile(tiny_tok.model_path, tmp_path / "hf" / "tokenizer.model")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, vocab_size=tiny_tok.vocab_size - 1)))
    with pytest.raises(ValueError, match=f"vocab_size {tiny_tok.vocab_size - 1} in config.json, but its tokenizer "
                                         f"has {tiny_tok.vocab_size} ids"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out3"))


# ---- each kind of tokenizer: in and out ------------------------------------------------------------------------

# (shape, tokenizer, padding rows): a Llama 2 with a dummy-prefix sentencepiece model (one trained like Llama 2's,
# Llama 2's own), a Llama 3 with a byte-level BPE, a Qwen2 with Qwen2's pipeline and a padded vocabulary. None has
# our chat tokens: the import appends them.
OWN_TOKENIZER = {"llama2-dummy-prefix": ("llama2", "dummy_prefix", 0), "llama2-published": ("llama2", "llama2", 0),
                 "llama3-byte-level": ("llama3", "byte_level", 0), "qwen2-padded": ("qwen2", "qwen2", 37),
                 "llama3-padded-as-long-as-the-chat-tokens": ("llama3", "byte_level", 4)}


@pytest.mark.parametrize("case", list(OWN_TOKENIZER))
def test_imported_models_with_their_own_tokenizers_give_transformers_logits_and_greedy_tokens(case, tokenizer_file,
                                                                                             tmp_path):
    shape, name, pad = OWN_TOKENIZER[case]
    hf = hf_random_folder(tokenizer_file(name), shape, tmp_path / "src", pad=pad)
    model, tok = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    n = tok.base_size
    assert model.args.vocab_size == tok.vocab_size == n + 4 and hf.config.vocab_size == n + pad
    ids = torch.tensor([tok.encode("白日依山尽，黄河入海流。 Hello  world")])
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
        assert (ours[..., :n] - theirs[..., :n]).abs().max().item() <= 1e-4
        # the appended chat tokens' rows are the mean row: each logit the mean of the tokenizer's own logits
        assert torch.allclose(ours[..., n:], ours[..., :n].mean(-1, keepdim=True).expand(-1, -1, 4), atol=1e-5)
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                             min_new_tokens=12, suppress_tokens=list(range(n, n + pad)) or None)  # padding: no token
    assert theirs[0, ids.shape[1]:].tolist() == generate(model, ids, 12, temperature=0.0)[0]


@pytest.mark.parametrize("case", ["llama2-dummy-prefix", "llama3-byte-level", "qwen2-padded"])
def test_export_then_import_with_the_models_own_tokenizer_is_the_identity(case, tokenizer_file, tmp_path):
    shape, name, pad = OWN_TOKENIZER[case]
    hf_random_folder(tokenizer_file(name), shape, tmp_path / "src", pad=pad)
    model, tok = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    export_hf(model, tok, str(tmp_path / "hf"))  # AutoTokenizer gives our ids (checked by the export)
    back, back_tok = import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert back_tok.vocab_size == tok.vocab_size and back_tok.kind == tok.kind
    assert all(back_tok.encode(s) == tok.encode(s) for s in HOSTILE)  # spelled chat tokens too: text both ways
    assert back_tok.special == tok.special


@pytest.mark.parametrize("name", ["ours", "dummy_prefix", "chatglm2", "llama2", "byte_level", "minimind"])
def test_autotokenizer_of_an_exported_folder_gives_our_ids_decode_and_chat_prompts(name, tokenizer_file, tmp_path):
    tok = Tokenizer(tokenizer_file(name))
    write_tokenizer(tok, str(tmp_path), 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    # what differs by design: spelled special tokens (transformers reads them as the tokens) and, in our kind, a
    # literal "▁" (our wrapper escapes it to bytes)
    texts = [s for s in HOSTILE if not spells_a_special(s) and not (tok.kind == "ours" and "▁" in s)]
    for s in texts:
        ids = hf_tok.encode(s, add_special_tokens=False)
        assert ids == tok.encode(s), repr(s)
        assert hf_tok.decode(ids) == tok.decode(ids), repr(s)
    for system, msgs in CONVERSATIONS:
        full = ([{"role": "system", "content": system}] if system else []) + msgs
        ids = hf_tok.apply_chat_template(full, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == encode_prompt(tok, msgs, system)


def test_pretraining_continues_from_an_imported_model(tiny_tok, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=72,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "src"))
    (tmp_path / "src" / "tokenizer.model").write_bytes(open(tiny_tok.model_path, "rb").read())
    model, imported_tok = import_hf(str(tmp_path / "src"), str(tmp_path / "imp"))
    save_merged(str(tmp_path / "imp" / "ckpt.pt"), model, iter_num=0, config={}, tokenizer=imported_tok.model_path,
                tokenizer_sha256=imported_tok.sha256())
    p = run_script("eval.py", f"--ckpt_path={tmp_path / 'imp' / 'ckpt.pt'}", "--max_new_tokens=4",
                   "--temperature=0.0", "--prompts=['床前']")
    assert "--- 床前" in p.stdout  # eval.py reads an imported checkpoint as any other
    data = tmp_path / "data"
    data.mkdir()
    write_motif_bins(data, tiny_tok.vocab_size, tiny_tok.vocab_size, 8, 12, 400, 600)
    common = [f"--init_ckpt={tmp_path / 'imp' / 'ckpt.pt'}", f"--train_data={data / 'train.bin'}",
              f"--val_data={data / 'val.bin'}", "--batch_size=2", "--gradient_accumulation_steps=1",
              "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--learning_rate=0.0", "--min_lr=0.0",
              "--warmup_iters=0", "--compile=False", "--dtype=float32", "--num_threads=1"]
    run_script("pretrain.py", f"--out_dir={tmp_path / 'run'}", *common)
    start = torch.load(tmp_path / "imp" / "ckpt.pt", weights_only=True)
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert after["model_args"]["hidden_dim"] == 72 and after["model_args"]["dim"] == 32
    assert all(torch.allclose(after["model"][k], start["model"][k]) for k in start["model"])  # lr 0: unchanged
    p = run_script("pretrain.py", f"--out_dir={tmp_path / 'run2'}", "--dim=64", *common, check=False)
    assert p.returncode != 0 and "decides the architecture" in p.stdout + p.stderr and "dim" in p.stdout + p.stderr


@pytest.mark.parametrize("shape,name", [("llama3", "byte_level"), ("qwen2", "qwen2")])
def test_pretraining_from_an_imported_model_keeps_its_biases_rope_scaling_and_tokenizer(shape, name, tokenizer_file,
                                                                                       tmp_path):
    """Continued pretraining of a Llama 3 (byte-level BPE) and a Qwen2 (Qwen2's pipeline) with their own tokenizers."""
    hf = hf_random_folder(tokenizer_file(name), shape, tmp_path / "src")
    model, tok = import_hf(str(tmp_path / "src"), str(tmp_path / "imp"))
    save_merged(str(tmp_path / "imp" / "ckpt.pt"), model, iter_num=0, config={}, tokenizer=tok.model_path,
                tokenizer_sha256=tok.sha256())
    data = tmp_path / "data"
    data.mkdir()
    write_motif_bins(data, tok.vocab_size, tok.base_size, 8, 12, 400, 600)
    meta = json.loads((data / "meta.json").read_text())  # as data_process.py writes it with the imported tokenizer
    meta.update(tokenizer_model=tok.model_path, tokenizer_sha256=tok.sha256())
    (data / "meta.json").write_text(json.dumps(meta))
    run_script("pretrain.py", f"--init_ckpt={tmp_path / 'imp' / 'ckpt.pt'}", f"--train_data={data / 'train.bin'}",
               "--val_data=", "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=1",
               "--eval_interval=100", "--learning_rate=0.0", "--min_lr=0.0", "--warmup_iters=0", "--compile=False",
               "--dtype=float32", "--num_threads=1", "--max_seq_len=32", f"--out_dir={tmp_path / 'run'}")
    after, ckpt = load_model(str(tmp_path / "run" / "ckpt.pt"))
    assert after.args.attention_bias == (shape == "qwen2")
    assert after.args.rope_scaling == (LLAMA3_SCALING if shape == "llama3" else None)
    assert ckpt["tokenizer_sha256"] == tok.sha256()
    ids = torch.tensor([tok.encode("白日依山尽，黄河入海流。")])
    with torch.no_grad():  # lr 0: still transformers' model, on the tokenizer's own ids
        n = tok.base_size
        assert (after.eval()(ids)[0][..., :n] - hf(ids).logits[..., :n]).abs().max().item() <= 1e-4


def test_a_lora_checkpoint_is_exported_merged(tiny_tok, tmp_path):
    base = random_model(tiny_tok, n_kv_heads=2)
    save_merged(str(tmp_path / "base.pt"), base, iter_num=0, config={}, tokenizer=tiny_tok.model_path,
                tokenizer_sha256=tiny_tok.sha256())
    adapted = random_model(tiny_tok, n_kv_heads=2)  # the same weights (same seed), then adapters that change them
    apply_lora(adapted, rank=2, alpha=4.0, targets=("wq", "wv", "w2"))
    with torch.no_grad():
        for p in lora_parameters(adapted):
            p.normal_(0, 0.3)
    save(str(tmp_path / "lora.pt"), {"lora": lora_state_dict(adapted), "model_args": base.args.__dict__,
                                     "lora_config": adapted.lora_config, "base_ckpt": str(tmp_path / "base.pt"),
                                     "iter_num": 1, "config": {}, "tokenizer": tiny_tok.model_path,
                                     "tokenizer_sha256": tiny_tok.sha256()})
    export_hf(load_model(str(tmp_path / "lora.pt"))[0], tiny_tok, str(tmp_path / "hf"))  # what export.py's main does
    hf, _ = load_hf(str(tmp_path / "hf"))
    ids = torch.tensor([tiny_tok.encode("春眠不觉晓，处处闻啼鸟。")])
    with torch.no_grad():
        want = adapted(ids)[0]  # base + adapters, unmerged
        assert (hf(ids).logits - want).abs().max().item() <= 1e-4
        assert (base(ids)[0] - want).abs().max().item() > 1e-2  # the adapters did change the model


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, as intended
def test_a_sharded_checkpoint_becomes_one_file(tiny_tok, tmp_path):
    model = random_model(tiny_tok, tie_embeddings=False)
    folder = tmp_path / "run" / "dcp" / "iter_00000003"  # the layout of an FSDP run (checkpoint.save_sharded)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder))
    torch.save({"iter_num": 3, "model_args": model.args.__dict__, "config": {}, "tokenizer": tiny_tok.model_path,
                "tokenizer_sha256": tiny_tok.sha256()}, folder / "extra.pt")
    os.symlink(os.path.relpath(folder, tmp_path / "run"), tmp_path / "run" / "ckpt.dcp")
    dcp_path = tmp_path / "run" / "ckpt.dcp"
    p = run_script("export.py", "--format=pt", f"--ckpt_path={dcp_path}", f"--out_dir={tmp_path / 'run'}")
    assert "model.pt" in p.stdout
    one = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert one["iter_num"] == 3 and "optim" not in one and one["model_args"]["tie_embeddings"] is False
    assert all(torch.equal(one["model"][k], v) for k, v in model.state_dict().items())
    p = run_script("export.py", "--format=pt", f"--ckpt_path={dcp_path}", f"--out_dir={tmp_path / 'run'}",
                   check=False)
    assert p.returncode != 0 and "exists" in p.stderr  # an existing model.pt is kept
    p = run_script("export.py", "--format=pt", f"--ckpt_path={tmp_path / 'run' / 'model.pt'}",
                   f"--out_dir={tmp_path / 'other'}", check=False)
    assert p.returncode != 0 and "not one" in p.stderr  # a single file is one already


