"""tokenizer/formats.py against the libraries it writes for: the tokenizer.json of a sentencepiece model encodes and
decodes as sentencepiece itself on hostile and random text; a byte-level tokenizer.json stays the source file plus the
chat tokens (tokenizers); GGUF vocabularies read back with gguf; llama.cpp's names of pre-tokenizers."""
import json

import pytest
import sentencepiece as spm
import tokenizers

from tokenizer import Tokenizer
from tokenizer.formats import gguf_pre_tokenizer, tokenizer_json
from tokenizer.tokenizer import CHAT_TOKENS, SPACE_MARK
from tokenizer_files import CORPUS, HOSTILE, published, random_texts, spells_a_special


@pytest.fixture(scope="module", params=["ours", "dummy_prefix", "chatglm2", "llama2"])
def sp_path(request, tiny_tok, dummy_prefix_model):
    if request.param == "ours":
        return tiny_tok.model_path
    if request.param == "dummy_prefix":
        return dummy_prefix_model
    return published(request.param, "tokenizer.model")


def test_sentencepiece_as_tokenizer_json_encodes_and_decodes_like_sentencepiece(sp_path, tmp_path):
    tok, sp = Tokenizer(sp_path), spm.SentencePieceProcessor(model_file=sp_path)
    tokenizer_json(tok).save(str(tmp_path / "tokenizer.json"))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what transformers reads
    texts = [s for s in HOSTILE if not spells_a_special(s)] + random_texts(extra=[SPACE_MARK])
    for s in texts:
        ids = hf.encode(s, add_special_tokens=False).ids
        assert ids == sp.encode(s), repr(s)
        assert hf.decode(ids) == sp.decode(ids), repr(s)
    appended = [t for t in CHAT_TOKENS if sp.piece_to_id(t) == sp.unk_id()]
    assert [hf.token_to_id(t) for t in appended] == list(range(sp.get_piece_size(), sp.get_piece_size() + len(appended)))


@pytest.fixture(scope="module", params=["tiny", "qwen2", "minimind"])
def json_path(request, tiny_json, qwen2_json):
    return {"tiny": tiny_json, "qwen2": qwen2_json}.get(request.param) or published("minimind", "tokenizer.json")


def test_byte_level_tokenizer_json_is_the_source_plus_the_chat_tokens(json_path):
    ref = tokenizers.Tokenizer.from_file(json_path)
    hf = tokenizer_json(Tokenizer(json_path))
    for s in [s for s in HOSTILE if not spells_a_special(s)] + random_texts(extra=["<think>"]):
        ids = hf.encode(s, add_special_tokens=False).ids
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s)
        assert hf.decode(ids) == ref.decode(ids)
    n = ref.get_vocab_size(with_added_tokens=True)
    assert [hf.token_to_id(t) for t in CHAT_TOKENS] == list(range(n, n + 4))
    assert hf.get_vocab_size(with_added_tokens=True) == n + 4


def test_llama_cpp_names_gpt2_and_qwen2_pre_tokenizers_and_refuses_others(tiny_json, qwen2_json):
    for path, name in ((tiny_json, "gpt-2"), (qwen2_json, "qwen2")):
        assert gguf_pre_tokenizer(json.load(open(path, encoding="utf-8")), path) == name
    gpt2, qwen2 = (json.load(open(p, encoding="utf-8")) for p in (tiny_json, qwen2_json))
    split, byte_level = qwen2["pre_tokenizer"]["pretokenizers"]
    others = [dict(gpt2, pre_tokenizer={"type": "Whitespace"}),
              dict(gpt2, pre_tokenizer=dict(gpt2["pre_tokenizer"], add_prefix_space=True)),
              dict(gpt2, normalizer={"type": "NFKC"}),
              dict(qwen2, pre_tokenizer={"type": "Sequence", "pretokenizers": [split, dict(byte_level, use_regex=True)]}),
              dict(qwen2, pre_tokenizer={"type": "Sequence", "pretokenizers": [dict(split, invert=True), byte_level]})]
    for spec in others:
        with pytest.raises(ValueError, match="x.json: normalizer .* none that llama.cpp names"):
            gguf_pre_tokenizer(spec, "x.json")


@pytest.mark.parametrize("option, message", [(dict(model_type="unigram"), "model_type 1 \\(not BPE\\)"),
                                             (dict(normalization_rule_name="nmt_nfkc"), "normalization 'nmt_nfkc'"),
                                             (dict(split_by_whitespace=False), "split_by_whitespace=false"),
                                             (dict(user_defined_symbols=["<tool>"]), "user-defined pieces \\['<tool>'\\]")])
def test_sentencepiece_options_not_reproduced_are_refused_by_name(option, message, tmp_path):
    kw = dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
              vocab_size=325, hard_vocab_limit=False, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "m"), **dict(kw, **option))
    tok = Tokenizer(str(tmp_path / "m.model"))
    with pytest.raises(ValueError, match=f"m.model: {message}: this sentencepiece model's encoding is not reproduced"):
        tokenizer_json(tok)


@pytest.mark.parametrize("kind", ["dummy_prefix", "byte_level"])
def test_gguf_vocabulary_reads_back_with_the_chat_tokens_as_control_tokens(kind, dummy_prefix_model, tiny_json,
                                                                           tmp_path):
    gguf = pytest.importorskip("gguf")
    from tokenizer.formats import add_gguf_vocab
    tok = Tokenizer(dummy_prefix_model if kind == "dummy_prefix" else tiny_json)
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), arch="llama")
    add_gguf_vocab(w, tok)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    r = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    f = {k: v.contents() for k, v in r.fields.items()}
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.vocab_size
    assert tokens[-4:] == CHAT_TOKENS and types[-4:] == [gguf.TokenType.CONTROL] * 4
    if kind == "dummy_prefix":
        sp = spm.SentencePieceProcessor(model_file=dummy_prefix_model)
        assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
        assert tokens[:sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    else:
        spec = json.load(open(tiny_json, encoding="utf-8"))
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
        assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
        assert tokens[tok.eos_id] == "<|endoftext|>" and f["tokenizer.ggml.eos_token_id"] == tok.eos_id
