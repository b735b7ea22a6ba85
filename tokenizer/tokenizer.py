"""Thin wrapper around a sentencepiece BPE model trained by tokenizer/train_tokenizer.py.

The one promise: decode(encode(s)) == s for every str s (no lone surrogates). Identity normalization, no dummy prefix
and byte fallback nearly give it; the hole is U+2581 "▁", sentencepiece's internal space, which would come back as " ".
So a literal "▁" is encoded as its three UTF-8 byte-fallback tokens.

Decoding goes through a per-id bytes table rather than sp.decode, so decode() and StreamDecoder are the same function by
construction (even for the broken byte sequences a badly trained model may sample)."""
import codecs
import hashlib
import os

import sentencepiece as spm

# Control symbols reserved at training time after <unk> <s> </s> <pad> (ids 4..15): chat fine-tuning needs no embedding
# resize, and text containing "<|user|>" encodes as plain characters, so users cannot forge turn boundaries.
SPECIAL_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] + [f"<|reserved_{i}|>" for i in range(8)]

SPACE_MARK = "\u2581"  # sentencepiece's internal stand-in for " "


class Tokenizer:
    def __init__(self, model_path):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path!r} "
                                    f"(train one with: python -m tokenizer --input=...)")
        self.model_path = model_path
        self.sp = sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()
        # piece_to_id returns unk for a missing piece, so keep only the ones that really are control symbols
        self.special = {t: sp.piece_to_id(t) for t in SPECIAL_TOKENS if sp.is_control(sp.piece_to_id(t))}
        self.system_id = self.special.get("<|system|>")
        self.user_id = self.special.get("<|user|>")
        self.assistant_id = self.special.get("<|assistant|>")
        self.end_id = self.special.get("<|end|>")  # end of turn

        # the bytes of each id: control ids none, byte-fallback ids a raw byte (maybe part of a UTF-8 character)
        self._bytes = []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                b = bytes([int(piece[3:5], 16)])  # "<0xE2>"
            elif sp.is_control(i) or sp.is_unused(i):
                b = b""
            elif sp.is_unknown(i):
                b = " \u2047 ".encode()
            else:
                b = piece.replace(SPACE_MARK, " ").encode()
            self._bytes.append(b)
        self._space_mark_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]

        # refuse models that cannot keep the round-trip promise (NFKC, dummy prefix...) rather than alter every document
        probe = "  a  b\t中文\n\nＡ▁😀 "
        if not all(sp.is_byte(i) for i in self._space_mark_ids) or self.decode(self.encode(probe)) != probe:
            raise ValueError(f"{model_path}: this sentencepiece model does not round-trip text; train it with "
                             f"tokenizer/train_tokenizer.py (identity normalization, no dummy prefix, byte fallback)")
        self._sha256 = None

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    def __reduce__(self):
        # the C++ processor does not pickle portably; reload from the path (DataLoader / multiprocessing workers)
        return (Tokenizer, (self.model_path,))

    def _encode_escaped(self, text):
        # a literal "▁" becomes its byte-fallback tokens, the pieces between are encoded normally
        ids = []
        for k, part in enumerate(text.split(SPACE_MARK)):
            if k:
                ids += self._space_mark_ids
            ids += self.sp.encode(part)
        return ids

    def encode(self, text, bos=False, eos=False):
        ids = self._encode_escaped(text) if SPACE_MARK in text else self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts, bos=False, eos=False, num_threads=-1):
        """Encode many texts in C++ threads (num_threads=-1: all cores), much faster than a Python loop."""
        texts = list(texts)
        out = self.sp.encode(texts, num_threads=num_threads)
        for i, text in enumerate(texts):
            if SPACE_MARK in text:  # rare: redo the few texts holding a literal "▁"
                out[i] = self._encode_escaped(text)
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]

    def decode(self, ids):
        """ids -> text, control ids dropped; invalid UTF-8 bytes (sampled ids only, never encode's) become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        if ids and min(ids) < 0:  # a list would happily index from the end (e.g. an ignore_index of -100)
            raise IndexError(f"token id {min(ids)} out of range [0, {self.vocab_size})")
        table = self._bytes
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i))

    def sha256(self):
        """Hex digest of the .model file, stored in data and checkpoint meta files to catch tokenizer mix-ups."""
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

    def put(self, token_id):
        i = int(token_id)
        if i < 0:
            raise IndexError(f"token id {i} out of range [0, {self.tokenizer.vocab_size})")
        return self._utf8.decode(self.tokenizer._bytes[i])

    def flush(self):
        """End of stream: an unfinished character becomes U+FFFD. The decoder can then be reused."""
        return self._utf8.decode(b"", final=True)


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
