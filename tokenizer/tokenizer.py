"""One Tokenizer interface (encode, decode, StreamDecoder, special and chat ids, sha256) over three kinds of tokenizer.

kind "ours": a sentencepiece BPE model as tokenizer/train_tokenizer.py writes it (identity normalization, no dummy
  prefix, byte fallback), or any model that passes the same check. Promise: decode(encode(s)) == s for every str s (no
  lone surrogates). The one hole sentencepiece leaves is U+2581 "▁", its internal space, which would come back as " ";
  so a literal "▁" is encoded as its three UTF-8 byte-fallback tokens (ids differ from sentencepiece's there only).
kind "sentencepiece": any other sentencepiece model with byte fallback (Llama 2's, ChatGLM2's: add_dummy_prefix=True).
  ids == sentencepiece's encode(s); decode == sentencepiece's decode (it strips the dummy-prefix space). Promise:
  decode(encode(s)) == sp.decode(sp.encode(s)); with identity normalization (Llama 2, ChatGLM2) that is s with each
  literal "▁" turned into " " (leading, double spaces, tabs, newlines all come back); a normalizing model (NFKC,
  remove_extra_whitespaces) returns the normal form. A model without byte fallback, or that loses a space, is refused.
kind "byte-level-bpe": a Hugging Face tokenizer.json (GPT-2 style: minimind's, Qwen2's, Llama 3's; ByteLevelBPE below).
  ids == tokenizers' encode(s, add_special_tokens=False) with special tokens' spellings encoded as text; decode ==
  tokenizers' decode (special tokens skipped). Promise: decode(encode(s)) == s, but for the normal form where the file
  has a normalizer (Qwen2's NFC) and the spaces an added token's lstrip/rstrip swallows.

The chat control tokens <|system|> <|user|> <|assistant|> <|end|> come from the model when it has them as control /
special tokens; otherwise they are appended after its vocabulary (ids n, n+1, ... as ChatGLM2 adds its own specials)
and vocab_size counts them. encode never yields them: text that spells them is encoded as text.

Decoding goes through a per-id bytes table rather than the library's decode, so decode() and StreamDecoder are the same
function by construction (even for the broken byte sequences a badly trained model may sample)."""
import codecs
import hashlib
import json
import os

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

# Control symbols reserved at training time after <unk> <s> </s> <pad> (ids 4..15): chat fine-tuning needs no embedding
# resize, and text containing "<|user|>" encodes as plain characters, so users cannot forge turn boundaries.
SPECIAL_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] + [f"<|reserved_{i}|>" for i in range(8)]

SPACE_MARK = "\u2581"  # sentencepiece's internal stand-in for " "
CHAT_TOKENS = SPECIAL_TOKENS[:4]  # what a published vocabulary gets appended when it lacks them
PROBE = "  a  b\t中文\n\nＡ▁😀 "  # what kind "ours" must return unchanged


def resolve_path(path):
    """A .model file, a tokenizer.json, or a folder holding tokenizer.model (preferred) or tokenizer.json -> the file.
    FileNotFoundError naming the path otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"tokenizer folder {path!r} holds no tokenizer.model or tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model not found: {path!r} "
                                f"(train one with: python -m tokenizer --input=...)")
    return path


class Tokenizer:
    """Tokenizer(path): path a sentencepiece .model, a tokenizer.json, or a folder holding one (resolve_path). kind,
    model_path (the file), base_size (the model's own ids), vocab_size (incl. appended chat tokens), bos/eos/pad/unk ids (-1 where the model has none),
    special {name: id}, system/user/assistant/end ids. ValueError naming the file for a model that cannot keep its
    kind's promise."""

    def __init__(self, model_path):
        self.model_path = model_path = resolve_path(model_path)
        self.sp = self._bpe = None
        self._strip_lead = self._keep_stripping = False  # sentencepiece's dummy-prefix space, stripped when decoding
        self._silent, self._lead_space = set(), set()
        if model_path.endswith(".json"):
            self._init_byte_level(model_path)
        else:
            self._init_sentencepiece(model_path)
        # chat control tokens the model lacks come after its vocabulary, in CHAT_TOKENS order
        for t in CHAT_TOKENS:
            if t not in self.special:
                self.special[t] = len(self._bytes)
                self._silent.add(len(self._bytes))
                self._bytes.append(b"")
        self.vocab_size = len(self._bytes)
        self.system_id = self.special.get("<|system|>")
        self.user_id = self.special.get("<|user|>")
        self.assistant_id = self.special.get("<|assistant|>")
        self.end_id = self.special.get("<|end|>")  # end of turn
        self._sha256 = None

    def _init_byte_level(self, path):
        self.kind = "byte-level-bpe"
        self._bpe = bpe = ByteLevelBPE(path)
        self.base_size = bpe.size
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.unk_id
        self.special = {t: bpe.special[t] for t in SPECIAL_TOKENS if t in bpe.special}
        self._bytes = list(bpe.table)

    def _init_sentencepiece(self, path):
        self.sp = sp = spm.SentencePieceProcessor(model_file=path)
        self.base_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
        # piece_to_id returns unk for a missing piece, so keep only the ones that really are control symbols
        self.special = {t: sp.piece_to_id(t) for t in SPECIAL_TOKENS if sp.is_control(sp.piece_to_id(t))}

        # the bytes of each id: control ids none, byte-fallback ids a raw byte (maybe part of a UTF-8 character)
        self._bytes = []
        for i in range(self.base_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                b = bytes([int(piece[3:5], 16)])  # "<0xE2>"
            elif sp.is_control(i) or sp.is_unused(i):
                b = b""
                self._silent.add(i)
            elif sp.is_unknown(i):
                b = " \u2047 ".encode()
            else:
                b = piece.replace(SPACE_MARK, " ").encode()
                if piece.startswith(SPACE_MARK):
                    self._lead_space.add(i)
            self._bytes.append(b)
        self._space_mark_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

        self.kind = "ours"
        if all(sp.is_byte(i) for i in self._space_mark_ids) and self.decode(self.encode(PROBE)) == PROBE:
            return
        # not lossless: any other model with byte fallback keeps sentencepiece's own ids and decode
        self.kind = "sentencepiece"
        if not all(sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256)):
            raise ValueError(f"{path}: this sentencepiece model has no byte fallback, so text outside its vocabulary "
                             f"becomes <unk> and does not round-trip; train one with tokenizer/train_tokenizer.py")
        self._strip_lead = sp.encode("a", out_type=str)[0].startswith(SPACE_MARK)  # add_dummy_prefix
        self._keep_stripping = not sp.encode("  ")  # remove_extra_whitespaces: all leading space goes
        self._strip_lead |= self._keep_stripping
        if self.decode(self.encode("a b")) != "a b":
            raise ValueError(f"{path}: this sentencepiece model has no space piece (\"{SPACE_MARK}\"), so a space "
                             f"does not round-trip; train one with tokenizer/train_tokenizer.py")

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer({self.model_path!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"

    def __reduce__(self):
        # the C++/Rust tokenizers do not pickle portably; reload from the path (DataLoader / multiprocessing workers)
        return (Tokenizer, (self.model_path,))

    def _encode_escaped(self, text):
        # a literal "▁" becomes its byte-fallback tokens, the pieces between are encoded normally
        ids = []
        for k, part in enumerate(text.split(SPACE_MARK)):
            if k:
                ids += self._space_mark_ids
            ids += self.sp.encode(part)
        return ids

    def _encode_text(self, text):
        if self._bpe is not None:
            return self._bpe.encode(text)
        if self.kind == "ours" and SPACE_MARK in text:
            return self._encode_escaped(text)
        return self.sp.encode(text)

    def encode(self, text, bos=False, eos=False):
        """str -> ids (list of int), with bos / eos around when asked. Never yields a chat control token."""
        return [self.bos_id] * bos + self._encode_text(text) + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False, num_threads=-1):
        """Encode many texts in C++/Rust threads (num_threads=-1: all cores; sentencepiece only, tokenizers sizes its
        own pool), much faster than a Python loop."""
        texts = list(texts)
        if self._bpe is not None:
            out = self._bpe.encode_batch(texts)
        else:
            out = self.sp.encode(texts, num_threads=num_threads)
            for i, text in enumerate(texts):
                if self.kind == "ours" and SPACE_MARK in text:  # rare: redo the few texts holding a literal "▁"
                    out[i] = self._encode_escaped(text)
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]

    def _join(self, ids, fresh):
        """(bytes of ids, fresh after them). fresh: nothing visible decoded yet, so a dummy-prefix model's first piece
        loses its leading space as in sentencepiece's decode (remove_extra_whitespaces: every leading space)."""
        table = self._bytes
        if not (self._strip_lead and fresh):
            return b"".join([table[i] for i in ids]), fresh
        out = []
        for n, i in enumerate(ids):
            b = table[i]
            if i in self._silent:  # control tokens decode to nothing and leave the start as it was
                continue
            if i in self._lead_space:
                b = b[1:]
            out.append(b)
            fresh = self._keep_stripping and not b
            if not fresh:
                out += [table[j] for j in ids[n + 1:]]
                break
        return b"".join(out), fresh

    def decode(self, ids):
        """ids -> text, control ids dropped; invalid UTF-8 bytes (sampled ids only, never encode's) become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        if ids and min(ids) < 0:  # a list would happily index from the end (e.g. an ignore_index of -100)
            raise IndexError(f"token id {min(ids)} out of range [0, {len(self._bytes)})")
        return self._join(ids, True)[0].decode("utf-8", errors="replace")

    def id_to_piece(self, i):
        i = int(i)
        if i >= self.base_size:  # an appended chat token
            return next(t for t, j in self.special.items() if j == i)
        return self._bpe.id_to_piece(i) if self._bpe is not None else self.sp.id_to_piece(i)

    def sha256(self):
        """Hex digest of the tokenizer file (.model or tokenizer.json), stored in data and checkpoint meta files to
        catch tokenizer mix-ups."""
        if self._sha256 is None:
            with open(self.model_path, "rb") as f:
                self._sha256 = hashlib.sha256(f.read()).hexdigest()
        return self._sha256


class StreamDecoder:
    """Decode a generated stream one token at a time: put(id) returns only the text that token completes (a character of
    several byte-fallback tokens is held back until its last byte). All put()s plus flush() equal decode(ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._fresh = True

    def put(self, token_id):
        i = int(token_id)
        if i < 0:
            raise IndexError(f"token id {i} out of range [0, {self.tokenizer.vocab_size})")
        b, self._fresh = self.tokenizer._join([i], self._fresh)
        return self._utf8.decode(b)

    def flush(self):
        """End of stream: an unfinished character becomes U+FFFD. The decoder can then be reused for a new stream."""
        self._fresh = True
        return self._utf8.decode(b"", final=True)


def _unicode_to_byte():
    """GPT-2's reversible byte <-> character map, inverted (character -> byte): the printable Latin-1 bytes stand for
    themselves, the other 68 bytes (controls, space, soft hyphen...) for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


UNICODE_TO_BYTE = _unicode_to_byte()


def token_bytes(token):
    """The bytes a byte-level token stands for; a token with a character outside the map (an added token such as
    "<|用户|>") stands for its own UTF-8, as in tokenizers' ByteLevel decoder."""
    if all(c in UNICODE_TO_BYTE for c in token):
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    return token.encode()


def _config_token(config, field):
    """tokenizer_config.json's bos_token/eos_token/... : a string, a {"content": ...} dict, or absent (None)."""
    value = config.get(field)
    return value.get("content") if isinstance(value, dict) else value


class ByteLevelBPE:
    """tokenizer.json -> size (ids incl. added tokens), table (bytes per id), special (special added tokens: name ->
    id), bos/eos/pad/unk ids (from tokenizer_config.json beside it; -1 where it names none). ValueError naming the file
    and field for a decoder other than ByteLevel, a config token missing from the vocabulary, or no eos token at all."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        decoder = (spec.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise ValueError(f"{path}: decoder {decoder!r} is not 'ByteLevel': only byte-level BPE tokenizer.json "
                             f"files are read (for a sentencepiece tokenizer give its tokenizer.model)")
        self.hf = hf = HFTokenizer.from_file(path)
        # text that merely spells a special token ("<|im_start|>") is encoded as text: users cannot forge turn marks
        hf.encode_special_tokens = True
        self.size = hf.get_vocab_size(with_added_tokens=True)
        added = hf.get_added_tokens_decoder()
        self.special = {t.content: i for i, t in added.items() if t.special}
        self.table = []
        for i in range(self.size):
            token = hf.id_to_token(i)
            skipped = token is None or (i in added and added[i].special)  # decode skips special tokens by default
            self.table.append(b"" if skipped else token_bytes(token))

        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        ids = []
        for field in ("bos_token", "eos_token", "pad_token", "unk_token"):
            name = _config_token(config, field)
            ids.append(-1 if name is None else hf.token_to_id(name))
            if ids[-1] is None:
                raise ValueError(f"{config_path}: {field} {name!r} is not a token of {path}")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids
        if self.eos_id < 0:
            raise ValueError(f"{path}: no eos token (documents are separated by it); name one as \"eos_token\" in "
                             f"{config_path}")

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def id_to_piece(self, i):
        return self.hf.id_to_token(i)


def load_tokenizer(path, vocab_size, sha256=""):
    """The Tokenizer at path, checked against the model: its vocabulary size and, when recorded, the sha256 of the
    tokenizer it was trained with (SystemExit naming the file when either differs)."""
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size:
        raise SystemExit(f"tokenizer {path} has {tok.vocab_size} tokens, the model {vocab_size}")
    if sha256 and tok.sha256() != sha256:
        raise SystemExit(f"{path} is not the tokenizer the model was trained with (sha256 {tok.sha256()[:12]}..., "
                         f"the checkpoint's {sha256[:12]}...)")
    return tok
