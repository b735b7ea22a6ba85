"""tokenizer/tokenizer.py's kinds against their reference libraries: sentencepiece models with a dummy prefix (one
the test trains, ChatGLM2's and Llama 2's where ../shared/tokenizers has them) against sentencepiece, and byte-level
BPE tokenizer.json files (one the test trains, minimind's) against tokenizers. Our own kind: test_tokenizer.py."""
import hashlib
import json
import os
import pickle
import random

import pytest
import sentencepiece as spm
import tokenizers

from tokenizer import StreamDecoder, Tokenizer
from tokenizer.chat_template import encode_prompt
from tokenizer.tokenizer import CHAT_TOKENS
from tokenizer_files import CORPUS, HOSTILE, published, train_byte_level


def stream(tok, ids):
    dec = StreamDecoder(tok)
    return "".join(dec.put(i) for i in ids) + dec.flush()


# ----------------------------------------------------------------------------- sentencepiece, dummy prefix


@pytest.fixture(scope="module", params=["tiny", "chatglm2", "llama2"])
def sp_model(request, dummy_prefix_model):
    if request.param == "tiny":
        return dummy_prefix_model
    return published(request.param, "tokenizer.model")


def test_sentencepiece_kind_ids_and_decode_equal_sentencepiece(sp_model):
    tok, ref = Tokenizer(sp_model), spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.kind == "sentencepiece"
    for s in HOSTILE:
        ids = tok.encode(s)
        assert ids == ref.encode(s), s
        assert tok.decode(ids) == ref.decode(ids) == stream(tok, ids), s
    assert tok.encode_batch(HOSTILE, num_threads=1) == ref.encode(HOSTILE, num_threads=1)


def test_sentencepiece_kind_round_trip_promise(sp_model):
    # identity normalization: everything comes back but a literal "▁", which is sentencepiece's space
    tok = Tokenizer(sp_model)
    for s in HOSTILE:
        assert tok.decode(tok.encode(s)) == s.replace("\u2581", " "), s
    assert tok.decode(tok.encode("a\u2581b")) == "a b" != "a\u2581b"


def test_sentencepiece_kind_decodes_any_pieces_like_sentencepiece(sp_model):
    # sampled ids: controls and pieces in any order, the dummy-prefix space stripped only where sentencepiece strips it
    tok, ref = Tokenizer(sp_model), spm.SentencePieceProcessor(model_file=sp_model)
    rng = random.Random(0)
    n = ref.get_piece_size()
    pieces = [i for i in range(n) if not ref.is_byte(i)]
    spaced = [i for i in pieces if ref.id_to_piece(i).startswith("\u2581")]
    controls = [i for i in range(n) if ref.is_control(i)]
    for _ in range(300):
        ids = [rng.choice((pieces, spaced, controls)[rng.randrange(3)]) for _ in range(rng.randint(0, 6))]
        assert tok.decode(ids) == ref.decode(ids) == stream(tok, ids), [ref.id_to_piece(i) for i in ids]
    for _ in range(100):  # byte-fallback ids too: the stream still equals decode
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 8))]
        assert stream(tok, ids) == tok.decode(ids)


def test_sentencepiece_kind_appends_chat_tokens_and_keeps_the_model_specials(sp_model):
    tok, ref = Tokenizer(sp_model), spm.SentencePieceProcessor(model_file=sp_model)
    n = ref.get_piece_size()
    assert [tok.special[t] for t in CHAT_TOKENS] == [n, n + 1, n + 2, n + 3]
    assert (tok.system_id, tok.user_id, tok.assistant_id, tok.end_id) == (n, n + 1, n + 2, n + 3)
    assert tok.vocab_size == len(tok) == n + 4
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (ref.bos_id(), ref.eos_id(), ref.pad_id(),
                                                                ref.unk_id())
    assert [tok.id_to_piece(n + k) for k in range(4)] == CHAT_TOKENS
    # a chat prompt: control ids decode to nothing, user text spelling them stays text
    ids = encode_prompt(tok, [{"role": "user", "content": "<|user|>hi"}])
    assert ids[0] == tok.user_id and ids[-1] == tok.assistant_id
    assert not set(ids[1:-2]) & {n, n + 1, n + 2, n + 3} and ids[1:-2] == ref.encode("<|user|>hi")
    assert tok.decode(ids) == ref.decode(ids[1:-2]) == "<|user|>hi"


def test_normalizing_sentencepiece_model_equals_sentencepiece(tmp_path):
    # NFKC and remove_extra_whitespaces (sentencepiece's defaults) with byte fallback: not lossless, but still its ids
    # and its decode, which strips every leading space
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "nfkc"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    path = str(tmp_path / "nfkc.model")
    tok, ref = Tokenizer(path), spm.SentencePieceProcessor(model_file=path)
    assert tok.kind == "sentencepiece"
    for s in HOSTILE:
        ids = tok.encode(s)
        assert ids == ref.encode(s) and tok.decode(ids) == ref.decode(ids) == stream(tok, ids), s
    assert tok.decode(tok.encode("  a  b")) == "a b"
    rng = random.Random(1)
    pieces = [i for i in range(ref.get_piece_size()) if not ref.is_byte(i)]
    for _ in range(300):
        ids = [rng.choice(pieces) for _ in range(rng.randint(0, 6))]
        assert tok.decode(ids) == ref.decode(ids) == stream(tok, ids), [ref.id_to_piece(i) for i in ids]


def test_published_sentencepiece_sizes():
    assert Tokenizer(published("chatglm2", "tokenizer.model")).vocab_size == 64_789 + 4  # fits uint16
    assert Tokenizer(published("llama2", "tokenizer.model")).vocab_size == 32_000 + 4


def test_sentencepiece_folder_sha256_and_pickle(dummy_prefix_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(open(dummy_prefix_model, "rb").read())
    tok = Tokenizer(tmp_path)  # a folder holding tokenizer.model
    assert tok.model_path == str(tmp_path / "tokenizer.model")
    assert tok.sha256() == hashlib.sha256((tmp_path / "tokenizer.model").read_bytes()).hexdigest()
    again = pickle.loads(pickle.dumps(tok))
    assert again.kind == tok.kind and again.encode(HOSTILE[-1]) == tok.encode(HOSTILE[-1])


# ----------------------------------------------------------------------------- Hugging Face byte-level BPE


@pytest.fixture(scope="module", params=["tiny", "minimind"])
def bpe_json(request, tiny_json):
    return tiny_json if request.param == "tiny" else published("minimind", "tokenizer.json")


def spells_a_special(ref, s):
    return any(t.special and t.content in s for t in ref.get_added_tokens_decoder().values())


def test_byte_level_ids_and_decode_equal_tokenizers(bpe_json):
    tok, ref = Tokenizer(bpe_json), tokenizers.Tokenizer.from_file(bpe_json)
    safe = tokenizers.Tokenizer.from_file(bpe_json)
    safe.encode_special_tokens = True  # what tokenizers gives when special tokens' spellings are text
    specials = {i for i, t in ref.get_added_tokens_decoder().items() if t.special}
    assert tok.kind == "byte-level-bpe"
    for s in HOSTILE + ["<think>x</think>"]:
        ids = tok.encode(s)
        assert ids == safe.encode(s, add_special_tokens=False).ids, s
        if not spells_a_special(ref, s):
            assert ids == ref.encode(s, add_special_tokens=False).ids, s
        assert not set(ids) & specials  # user text never becomes a special token
        assert tok.decode(ids) == ref.decode(ids) == stream(tok, ids) == s, s  # no normalizer: lossless
    assert tok.encode_batch(HOSTILE) == [tok.encode(s) for s in HOSTILE]


def test_byte_level_decodes_any_ids_like_tokenizers(bpe_json):
    # sampled ids, specials and broken UTF-8 included: the same text (U+FFFD alike), the stream too
    tok, ref = Tokenizer(bpe_json), tokenizers.Tokenizer.from_file(bpe_json)
    rng = random.Random(0)
    n = ref.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 8))]
        assert tok.decode(ids) == ref.decode(ids) == stream(tok, ids), ids


def test_byte_level_chat_tokens_specials_and_sha256(bpe_json):
    tok, ref = Tokenizer(bpe_json), tokenizers.Tokenizer.from_file(bpe_json)
    n = ref.get_vocab_size()
    assert [tok.special[t] for t in CHAT_TOKENS] == [n, n + 1, n + 2, n + 3] and tok.vocab_size == n + 4
    assert tok.decode([tok.user_id] + tok.encode("hi") + [tok.end_id]) == "hi"
    with open(os.path.join(os.path.dirname(bpe_json), "tokenizer_config.json")) as f:
        config = json.load(f)
    eos, bos = config["eos_token"], config["bos_token"]
    assert tok.eos_id == ref.token_to_id(eos)
    assert tok.bos_id == ref.token_to_id(bos["content"] if isinstance(bos, dict) else bos)
    assert tok.sha256() == hashlib.sha256(open(bpe_json, "rb").read()).hexdigest()
    assert Tokenizer(os.path.dirname(bpe_json)).model_path == bpe_json  # the folder holding it
    assert pickle.loads(pickle.dumps(tok)).encode(HOSTILE[8]) == tok.encode(HOSTILE[8])


def test_byte_level_without_eos_or_with_another_decoder_is_refused(tmp_path):
    path = train_byte_level(str(tmp_path / "no_eos"), eos=None)
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer(path)
    spec = json.load(open(path))
    spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="ByteLevel"):
        Tokenizer(tmp_path / "meta" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)
