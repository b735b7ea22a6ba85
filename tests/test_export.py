"""export.py: a Hugging Face folder that transformers loads offline and that computes our logits, greedy text and
chat-template ids; import of a Hugging Face Llama folder; export then import is the identity; what import refuses."""
import json
import os

import pytest
import torch

from conftest import run_script
from sft_fixtures import tiny_tokenizer
from checkpoint import save_merged
from export import export_hf, import_hf
from model import ModelArgs, Transformer
from tokenizer.chat_template import encode_prompt

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def random_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(dim=48, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=64, multiple_of=16)
    m = Transformer(ModelArgs(**dict(args, **kw)))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)  # norms too: no weight left at its init
    return m.eval()


def load_hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


SHAPES = {"base": {}, "gqa": dict(n_kv_heads=2), "untied": dict(tie_embeddings=False),
          "untied_gqa_multiplier_theta": dict(tie_embeddings=False, n_kv_heads=1, ffn_dim_multiplier=1.3,
                                              rope_theta=500.0)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exported_folder_gives_our_logits_and_greedy_text(tok, tmp_path, shape):
    model = random_model(tok, **SHAPES[shape])
    export_hf(model, tok, str(tmp_path / "hf"))
    hf, _ = load_hf(str(tmp_path / "hf"))
    ids = torch.tensor([tok.encode("床前明月光，疑是地上霜。举头望明月，")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max().item() <= 1e-4
        theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                             min_new_tokens=12)[0, ids.shape[1]:].tolist()
    assert theirs == model.generate(ids, 12, temperature=0.0)[0]


def test_bf16_export_stores_bf16_weights(tok, tmp_path):
    from safetensors import safe_open
    export_hf(random_model(tok), tok, str(tmp_path / "hf"), "bfloat16")
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
def test_apply_chat_template_gives_our_prompt_ids(tok, tmp_path, use_fast):
    export_hf(random_model(tok), tok, str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True,
                                                        use_fast=use_fast)
    for system, msgs in CONVERSATIONS:
        full = ([{"role": "system", "content": system}] if system else []) + msgs
        ids = hf_tok.apply_chat_template(full, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == encode_prompt(tok, msgs, system)
    assert hf_tok.decode(tok.encode("床前明月光 a\tb")) == "床前明月光 a\tb"


def test_import_gives_the_logits_of_transformers(tok, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=100,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(tmp_path / "src"))
    (tmp_path / "src" / "tokenizer.model").write_bytes(open(tok.model_path, "rb").read())
    model, _ = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    assert model.args.hidden_dim == 100 and model.args.n_kv_heads == 2  # a width the multiple_of rule cannot give
    ids = torch.tensor([tok.encode("白日依山尽，黄河入海流。")])
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4


def test_export_then_import_is_the_identity_on_weights_and_tokenizer(tok, tmp_path):
    model = random_model(tok, n_kv_heads=2, tie_embeddings=False)
    save_merged(str(tmp_path / "ckpt.pt"), model, iter_num=3, config={}, tokenizer=tok.model_path,
                tokenizer_sha256=tok.sha256())
    run_script("export.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'hf'}")
    run_script("export.py", f"--import_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'back'}")
    back = torch.load(tmp_path / "back" / "ckpt.pt", weights_only=True)
    theirs, ours = back["model"], model.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert open(tmp_path / "back" / "tokenizer.model", "rb").read() == open(tok.model_path, "rb").read()
    assert back["tokenizer_sha256"] == tok.sha256()
    # and eval.py reads the imported checkpoint as any other
    p = run_script("eval.py", f"--ckpt_path={tmp_path / 'back' / 'ckpt.pt'}", "--max_new_tokens=4",
                   "--temperature=0.0", "--prompts=['床前']")
    assert "--- 床前" in p.stdout


@pytest.mark.parametrize("field,value,message", [
    ("attention_bias", True, "attention_bias=true; this Llama 2 has no biases"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("model_type", "mistral", "model_type 'mistral'"),
])
def test_import_refuses_what_it_cannot_represent_naming_the_field(tok, tmp_path, field, value, message):
    export_hf(random_model(tok), tok, str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_import_refuses_a_tokenizer_that_is_not_sentencepiece(tok, tmp_path):
    export_hf(random_model(tok), tok, str(tmp_path / "hf"))
    os.remove(tmp_path / "hf" / "tokenizer.model")
    with pytest.raises(ValueError, match="no tokenizer.model; the tokenizer must be a sentencepiece model"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    p = run_script("export.py", f"--import_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out2'}", check=False)
    assert p.returncode == 1 and "no tokenizer.model" in p.stderr
