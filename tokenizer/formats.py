"""The tokenizer as other libraries read it: a tokenizer.json for transformers' AutoTokenizer and the vocabulary of a
GGUF file for llama.cpp, for each kind of Tokenizer (tokenizer/tokenizer.py).

A sentencepiece model (kinds "ours" and "sentencepiece") becomes a byte-fallback BPE tokenizer.json that encodes as
sentencepiece does: spaces become "▁" (after a leading "▁" for a dummy-prefix model), the text is cut into
sentencepiece's words (SP_WORD), and merges are ranked by the score of the
piece they make, the pair sentencepiece's BPE merges first. transformers' own conversion differs on runs of spaces
(it ranks Llama 2's "▁▁" first and merges across words). A byte-level BPE tokenizer.json is written as it is. Both get
the chat tokens the Tokenizer appended, as special added tokens with the same ids."""
import json

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from tokenizer.tokenizer import CHAT_TOKENS, SPACE_MARK

# sentencepiece's words (SplitIntoWords): with allow_whitespace_only_pieces (Llama 2, ChatGLM2 and ours) a run of "▁"
# and what follows up to the next "▁"; without it, every "▁" begins a word
SP_WORD = {True: f"{SPACE_MARK}*[^{SPACE_MARK}]+|{SPACE_MARK}+", False: f"{SPACE_MARK}?[^{SPACE_MARK}]+|{SPACE_MARK}"}

# the byte-level pre-tokenizer regexes llama.cpp knows by name (GGUF tokenizer.ggml.pre): Qwen2's, Llama 3's
GGUF_PRE = {r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
            "qwen2",
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
            "llama-bpe"}


def check_sentencepiece(path):
    """The model's allow_whitespace_only_pieces. ValueError naming the file and the options when the sentencepiece
    model at path is one tokenizer.json and GGUF are not written for: a unigram model, normalization (NFKC, removed
    extra whitespace), words not split at spaces, whitespace as a suffix, user-defined pieces."""
    m = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    t, n = m.trainer_spec, m.normalizer_spec
    user = [p.piece for p in m.pieces if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED]
    wrong = [what for what, bad in (
        (f"model_type {t.model_type} (not BPE)", t.model_type != t.BPE),
        (f"normalization {n.name!r}", n.name != "identity" or bool(n.precompiled_charsmap)),
        ("remove_extra_whitespaces", n.remove_extra_whitespaces), ("split_by_whitespace=false", not t.split_by_whitespace),
        ("treat_whitespace_as_suffix", t.treat_whitespace_as_suffix),
        (f"user-defined pieces {user[:3]}", bool(user))) if bad]
    if wrong:
        raise ValueError(f"{path}: {', '.join(wrong)}: this sentencepiece model's encoding is not reproduced in a "
                         f"tokenizer.json or GGUF here (Llama 2's, ChatGLM2's and ours are)")
    return t.allow_whitespace_only_pieces


def sentencepiece_merges(sp):
    """BPE merges [(left, right)] of a sentencepiece BPE model: every way to cut a normal piece into two pieces, ranked by
    the piece's score, highest first (sentencepiece merges the adjacent pair whose result scores highest)."""
    vocab = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    ranked = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                ranked.append((-sp.get_score(i), i, k, (piece[:k], piece[k:])))
    return [m for *_, m in sorted(ranked)]


def _sentencepiece_json(tok):
    whitespace_runs = check_sentencepiece(tok.model_path)
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf = HFTokenizer(models.BPE(vocab, sentencepiece_merges(sp), unk_token=sp.id_to_piece(sp.unk_id()),
                                byte_fallback=True, fuse_unk=True))
    prefix = [normalizers.Prepend(SPACE_MARK)] if tok._strip_lead else []
    hf.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", SPACE_MARK)])
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(SP_WORD[whitespace_runs]), behavior="isolated")
    strip = [decoders.Strip(" ", 1, 0)] if tok._strip_lead else []  # sentencepiece's decode drops the dummy prefix
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    hf.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                           for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)])
    return hf


def tokenizer_json(tok):
    """tok (a Tokenizer) as a tokenizers.Tokenizer: encode(text, add_special_tokens=False).ids == tok.encode(text) and
    decode == tok.decode, but for text spelling a special token (the library reads it as the token) and, in kind "ours",
    a literal "▁" (read as a space). ValueError if the appended chat tokens would get other ids."""
    hf = HFTokenizer.from_file(tok.model_path) if tok.kind == "byte-level-bpe" else _sentencepiece_json(tok)
    appended = [t for t in CHAT_TOKENS if tok.special[t] >= tok.base_size]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in appended])
    wrong = [t for t in CHAT_TOKENS if hf.token_to_id(t) != tok.special[t]]
    if wrong:
        raise ValueError(f"{tok.model_path}: {wrong} would get other ids in tokenizer.json than in our Tokenizer")
    return hf


def gguf_pre_tokenizer(spec, path):
    """llama.cpp's name (tokenizer.ggml.pre) of the pre-tokenizer of tokenizer.json spec (a dict) read from path:
    'gpt-2' for ByteLevel's own regex, 'qwen2' or 'llama-bpe' for their Split regex (isolated) before a ByteLevel without
    regex; no prefix space; no normalizer but Qwen2's NFC (llama.cpp does not normalize: text already in NFC, as
    nearly all is, gets the same ids). ValueError naming the file for anything else, which llama.cpp would cut
    differently."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps and steps[-1].get("type") == "ByteLevel" else {}
    name = None
    if not norm or norm.get("type") == "NFC":
        if len(steps) == 1 and byte_level and byte_level.get("use_regex", True):
            name = "gpt-2"
        elif len(steps) == 2 and byte_level and not byte_level.get("use_regex", True):
            split = steps[0]
            if split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert"):
                name = GGUF_PRE.get(split.get("pattern", {}).get("Regex"))
    if name is None or byte_level.get("add_prefix_space"):
        raise ValueError(f"{path}: normalizer {json.dumps(norm)[:80]}, pre_tokenizer {json.dumps(pre)[:200]}: none "
                         f"that llama.cpp names (GPT-2's, Qwen2's, Llama 3's); a GGUF file would tokenize differently")
    return name


def add_gguf_vocab(w, tok):
    """Write tok's vocabulary into w (a gguf.GGUFWriter): model 'llama' (sentencepiece: pieces, scores, types; the
    dummy prefix as add_space_prefix) or 'gpt2' (byte-level BPE: tokens, merges, the pre-tokenizer's name), and the
    special ids. Appended chat tokens are control tokens. ValueError from gguf_pre_tokenizer."""
    import gguf
    T = gguf.TokenType
    if tok.kind == "byte-level-bpe":
        with open(tok.model_path, encoding="utf-8") as f:
            spec = json.load(f)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(gguf_pre_tokenizer(spec, tok.model_path))
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        types = [T.CONTROL if i >= tok.base_size or added.get(i, {}).get("special")
                 else T.USER_DEFINED if i in added else T.NORMAL for i in range(tok.vocab_size)]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    else:
        check_sentencepiece(tok.model_path)
        sp = tok.sp
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores([sp.get_score(i) if i < tok.base_size else 0.0 for i in range(tok.vocab_size)])
        types = [T.CONTROL if i >= tok.base_size or sp.is_control(i) else T.UNKNOWN if sp.is_unknown(i)
                 else T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL
                 for i in range(tok.vocab_size)]
        w.add_add_space_prefix(tok._strip_lead)  # ours: trained without sentencepiece's dummy prefix
    w.add_token_list([tok.id_to_piece(i) for i in range(tok.vocab_size)])  # appended chat tokens by name
    w.add_token_types(types)
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                   (w.add_unk_token_id, tok.unk_id), (w.add_pad_token_id, tok.pad_id), (w.add_eot_token_id, tok.end_id)):
        if i is not None and i >= 0:
            add(i)  # eot: end of turn, chat generation stops on it
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
