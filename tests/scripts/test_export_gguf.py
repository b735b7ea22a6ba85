"""export.py --format=gguf: the file holds our tensors (llama.cpp's RoPE row order), tokenizer and template; what it
refuses; and llama.cpp itself (llama-cpp-python, tests marked slow) tokenizes and continues as we do, for our
tokenizer, a dummy-prefix sentencepiece model and a byte-level BPE."""
import os

import numpy as np
import pytest
import torch

from babyllama.generate import generate
from export import CHAT_TEMPLATE, export_gguf, gguf_name, gguf_rope_rows, import_hf
from hf_models import LLAMA3_SCALING, hf_random_folder, random_model
from model import apply_rope, ffn_hidden_dim
from tokenizer_files import HOSTILE, random_texts, spells_a_special


def test_gguf_export_refuses_rope_scaling_writing_nothing(tiny_tok, tmp_path):
    with pytest.raises(ValueError, match="GGUF export of a model with rope_scaling="):
        export_gguf(random_model(tiny_tok, rope_scaling=LLAMA3_SCALING), tiny_tok, str(tmp_path / "m.gguf"))
    assert not os.listdir(tmp_path)

def read_gguf(path):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(path))
    tensors = {}
    for t in r.tensors:
        a = gguf.dequantize(t.data, t.tensor_type) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0 else t.data
        tensors[t.name] = (torch.from_numpy(np.array(a, dtype=np.float32)), t.tensor_type)
    return tensors, {k: f.contents() for k, f in r.fields.items()}


def ours_in_gguf_layout(model):
    """Our tensors under llama.cpp's names, wq/wk rows in the interleaved RoPE layout: computed here from the
    rule (row 2i <- row i, row 2i + 1 <- row hd/2 + i of each head), not with export.gguf_rope_rows."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and model.args.tie_embeddings:
            continue
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = model.args.n_heads if "wq" in name else (model.args.n_kv_heads or model.args.n_heads)
            hd = t.shape[0] // heads
            order = [h * hd + (i // 2 if i % 2 == 0 else hd // 2 + i // 2) for h in range(heads) for i in range(hd)]
            t = t[order]
        out[gguf_name(name)] = t.float()
    return out


@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_gguf_file_holds_our_tensors_tokenizer_and_template(tiny_tok, tmp_path, dtype):
    model = random_model(tiny_tok, dim=64, n_kv_heads=2, tie_embeddings=False)
    export_gguf(model, tiny_tok, str(tmp_path / "m.gguf"), dtype)
    tensors, fields = read_gguf(tmp_path / "m.gguf")
    want = ours_in_gguf_layout(model)
    assert tensors.keys() == want.keys()
    for name, w in want.items():
        got, kind = tensors[name]
        got = got.reshape(w.shape)
        if dtype == "float32" or w.dim() == 1:
            assert torch.equal(got, w), name
        else:  # q8_0: blocks of 32, x ~ q * d with d = max|x| / 127 stored in fp16 (relative error <= 2^-11):
            # |error| <= d / 2 (rounding q) + 127 * d * 2^-11 (the scale's own rounding) = 0.562 d
            blocks = w.reshape(-1, 32)
            bound = blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2 ** -11) + 1e-7
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), name
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == ffn_hidden_dim(model.args)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [tiny_tok.sp.id_to_piece(i) for i in range(tiny_tok.vocab_size)]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tiny_tok.bos_id, tiny_tok.eos_id, tiny_tok.pad_id)
    assert fields["tokenizer.ggml.eot_token_id"] == tiny_tok.end_id
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_a_qwen2_gguf_holds_its_biases_and_unreordered_rows(tiny_tok, tmp_path):
    model = random_model(tiny_tok, dim=64, n_kv_heads=2, attention_bias=True)
    export_gguf(model, tiny_tok, str(tmp_path / "m.gguf"))
    tensors, fields = read_gguf(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "qwen2" and fields["qwen2.attention.head_count_kv"] == 2
    for name, t in model.state_dict().items():  # rotate-half RoPE in llama.cpp's qwen2: every tensor as ours
        if name != "output.weight":
            assert torch.equal(tensors[gguf_name(name)][0].reshape(t.shape), t.float()), name
    assert "blk.0.attn_q.bias" in tensors and "blk.1.attn_v.bias" in tensors


def test_interleaved_rope_on_reordered_rows_gives_our_attention_scores(tiny_tok):
    # llama.cpp's "llama" RoPE, written here from its definition: dims (2i, 2i + 1) of a head rotate by
    # pos * theta^(-2i / hd). Applied to the reordered wq/wk it must give our queries . keys at every position.
    model = random_model(tiny_tok, dim=64, n_kv_heads=4)
    att = model.layers[0].attention
    H, hd, T = 4, 16, 7
    x = torch.randn(T, 64)
    q, k = x @ att.wq.weight.T, x @ att.wk.weight.T
    ours = [apply_rope(v.view(1, T, H, hd).transpose(1, 2), model.rope_cos[:T], model.rope_sin[:T]) for v in (q, k)]
    scores = ours[0] @ ours[1].transpose(-1, -2)
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    angle = pos * model.args.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (T, hd/2)
    cos, sin = angle.cos().float(), angle.sin().float()

    def interleaved(v):
        v = v.view(T, H, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(T, H, hd).transpose(0, 1)

    qg = interleaved(x @ gguf_rope_rows(att.wq.weight, H).T)
    kg = interleaved(x @ gguf_rope_rows(att.wk.weight, H).T)
    assert torch.allclose(qg @ kg.transpose(-1, -2), scores[0], atol=1e-4)


@pytest.mark.slow
def test_llama_cpp_continues_our_gguf_as_we_do(tiny_tok, tmp_path):
    """A real llama.cpp (llama-cpp-python compiles it at install: pip install llama-cpp-python) reads the f32
    and q8_0 files and its greedy continuation equals ours (f32) / starts as ours does (q8_0)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp "
                                                         "from source: pip install llama-cpp-python)")
    model = random_model(tiny_tok, dim=64, n_kv_heads=2, tie_embeddings=False, max_seq_len=64)
    prompt = [tiny_tok.eos_id] + tiny_tok.encode("床前明月光，疑是地上霜。")
    ours = generate(model, torch.tensor([prompt]), 16, temperature=0.0)[0]
    # q8_0 rounds weights (and llama.cpp its activations) to 8 bits: a random model's near-ties part ways after a
    # few tokens (the trained demo model's 32 greedy tokens matched on 3 prompts: see the README)
    for dtype, n_equal in (("float32", 16), ("q8_0", 2)):
        path = tmp_path / f"m-{dtype}.gguf"
        export_gguf(model, tiny_tok, str(path), dtype)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
        assert llm.tokenize("床前明月光，疑是地上霜。".encode(), add_bos=False, special=False) == prompt[1:]
        theirs = []
        for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == 16:
                break
        assert theirs[:n_equal] == ours[:n_equal], dtype


@pytest.mark.slow
@pytest.mark.parametrize("shape,name", [("llama2", "byte_level"), ("llama2", "dummy_prefix"), ("qwen2", "qwen2")])
def test_llama_cpp_tokenizes_and_continues_an_imported_model_with_its_own_tokenizer_as_we_do(shape, name,
                                                                                            tokenizer_file, tmp_path):
    """A Llama 2-shape model imported with a byte-level BPE (GGUF "gpt2", pre-tokenizer "gpt-2") or a dummy-prefix
    sentencepiece model (GGUF "llama", add_space_prefix), a Qwen2 (GGUF "qwen2": q/k/v biases) with Qwen2's pipeline
    (pre-tokenizer "qwen2"): llama.cpp's ids for hostile and random text and its greedy continuation equal ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp "
                                                         "from source: pip install llama-cpp-python)")
    hf_random_folder(tokenizer_file(name), shape, tmp_path / "src")
    model, tok = import_hf(str(tmp_path / "src"), str(tmp_path / "ours"))
    export_gguf(model, tok, str(tmp_path / "m.gguf"))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=1, verbose=False)
    texts = [s for s in HOSTILE if not spells_a_special(s)] + random_texts(200)
    for s in texts:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode(s), repr(s)
        text = llm.detokenize(tok.encode(s)).decode()
        if name == "dummy_prefix":  # llama.cpp's detokenize keeps the dummy prefix's space, sentencepiece's drops it
            text = text.removeprefix(" ")
        assert text == tok.decode(tok.encode(s)), repr(s)
    prompt = tok.encode("床前明月光，疑是地上霜。")
    ours = generate(model, torch.tensor([prompt]), 16, temperature=0.0)[0]
    theirs = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 16:
            break
    assert theirs == ours
