"""The tokenizer as other libraries read it: a tokenizer.json for transformers' AutoTokenizer and the vocabulary of a
GGUF file for llama.cpp, for each kind of Tokenizer (tokenizer/tokenizer.py).

A sentencepiece model (kinds "ours" and "sentencepiece") becomes a byte-fallback BPE tokenizer.json that encodes as
sentencepiece does: spaces become "▁" (after a leading "▁" for a dummy-prefix model), the text is cut into
sentencepiece's words (a run of "▁" and what follows up to the next "▁"), and merges are ranked by the score of the
piece they make, the pair sentencepiece's BPE merges first. transformers' own conversion differs on runs of spaces
(it ranks Llama 2's "▁▁" first and merges across words). A byte-level BPE tokenizer.json is written as it is. Both get
the chat tokens the Tokenizer appended, as special added tokens with the same ids."""
import json

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from tokenizer.tokenizer import CHAT_TOKENS, SPACE_MARK

# sentencepiece's SplitIntoWords with allow_whitespace_only_pieces (Llama 2, ChatGLM2 and ours are trained with it)
SP_WORD = f"{SPACE_MARK}*[^{SPACE_MARK}]+|{SPACE_MARK}+"

# the byte-level pre-tokenizer regexes llama.cpp knows by name (GGUF tokenizer.ggml.pre): Qwen2's, Llama 3's
GGUF_PRE = {r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
            "qwen2",
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
            "llama-bpe"}


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
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf = HFTokenizer(models.BPE(vocab, sentencepiece_merges(sp), unk_token=sp.id_to_piece(sp.unk_id()),
                                byte_fallback=True, fuse_unk=True))
    prefix = [normalizers.Prepend(SPACE_MARK)] if tok._strip_lead else []
    hf.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", SPACE_MARK)])
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(SP_WORD), behavior="isolated")
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
    'gpt-2' for ByteLevel's own regex, 'qwen2' or 'llama-bpe' for their Split regex before ByteLevel. ValueError naming
    the file for one llama.cpp would cut differently."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        name = GGUF_PRE.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre)[:200]} is none that llama.cpp names (GPT-2's, Qwen2's, "
                     f"Llama 3's); a GGUF file would tokenize differently")


def add_gguf_vocab(w, tok):
    """Write tok's vocabulary into w (a gguf.GGUFWriter): model 'llama' (sentencepiece: pieces, scores, types; the
    dummy prefix as add_space_prefix) or 'gpt2' (byte-level BPE: tokens, merges, the pre-tokenizer's name), and the
    special ids. Appended chat tokens are control tokens. ValueError from gguf_pre_tokenizer."""
    import gguf
    T = gguf.TokenType
    names = {i: t for t, i in tok.special.items()}
    if tok.kind == "byte-level-bpe":
        with open(tok.model_path, encoding="utf-8") as f:
            spec = json.load(f)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(gguf_pre_tokenizer(spec, tok.model_path))
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        tokens = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
        types = [T.CONTROL if i >= tok.base_size or added.get(i, {}).get("special")
                 else T.USER_DEFINED if i in added else T.NORMAL for i in range(tok.vocab_size)]
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    else:
        sp = tok.sp
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        tokens = [sp.id_to_piece(i) if i < tok.base_size else names[i] for i in range(tok.vocab_size)]
        w.add_token_scores([sp.get_score(i) if i < tok.base_size else 0.0 for i in range(tok.vocab_size)])
        types = [T.CONTROL if i >= tok.base_size or sp.is_control(i) else T.UNKNOWN if sp.is_unknown(i)
                 else T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL
                 for i in range(tok.vocab_size)]
        w.add_add_space_prefix(tok._strip_lead)  # ours: trained without sentencepiece's dummy prefix
    w.add_token_list(tokens)
    w.add_token_types(types)
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                   (w.add_unk_token_id, tok.unk_id), (w.add_pad_token_id, tok.pad_id), (w.add_eot_token_id, tok.end_id)):
        if i is not None and i >= 0:
            add(i)  # eot: end of turn, chat generation stops on it
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
