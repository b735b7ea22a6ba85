"""Train the project's sentencepiece BPE tokenizer on text files (the CLI is tokenizer/__main__.py):

    python -m tokenizer --input=data/clean/zh.jsonl,data/clean/en/ --vocab_size=8000
    python -m tokenizer config/tok.py --model_prefix=out/tokenizer/tok16k

input: comma-separated files, globs (** works) or directories (recursive), read through babyllama/readers.py. Text
streams into sentencepiece line by line up to max_chars, sampled to input_sentence_size lines, so memory stays bounded.
Writes <model_prefix>.model and .vocab atomically, and only a model tokenizer.Tokenizer loads as kind "ours" (lossless):
a corpus with no (or too few) spaces leaves "▁" out of the vocabulary, so it is trained a second time with that piece
required (sentencepiece's required_chars); every other corpus gives the same file as before."""
import functools
import glob
import itertools
import os
import random
import re
import time

import sentencepiece as spm

from babyllama import readers
from babyllama.records import ReadErrors
from tokenizer.tokenizer import SPACE_MARK, SPECIAL_TOKENS, Tokenizer

# -----------------------------------------------------------------------------
input = ""  # comma-separated files / globs / directories
vocab_size = 8000
model_prefix = "out/tokenizer/tok8k"
max_sentence_length = 16384  # bytes; sentencepiece drops longer lines, so we cut them into chunks
input_sentence_size = 2_000_000  # lines sampled (reservoir, seeded) for training, bounds memory on big corpora; 0 = all
max_chars = 200_000_000  # stop reading input after this many characters
character_coverage = 0.995  # rarer characters use byte fallback; 0.9995 needs >10k pieces on classical Chinese
num_threads = 2
text_field = ""  # json/jsonl/parquet field holding the text ("" = reader's default)
seed = 1337
verbose = False  # True: sentencepiece's whole training log (~360 lines) and a sample tokenization
# -----------------------------------------------------------------------------

# token files are uint16, and the fixed head of the vocab: <unk> <s> </s> <pad>, chat/reserved, 256 bytes
MAX_VOCAB = 65535
N_FIXED = 4 + len(SPECIAL_TOKENS) + 256


def input_items(spec):
    """'a.txt,dir/,data/**/*.jsonl' (or a list) -> the items, each checked to match something up front: inside
    sentencepiece's training loop an error only surfaces as an opaque RuntimeError."""
    items = spec.split(",") if isinstance(spec, str) else [os.fspath(p) for p in spec]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError("no tokenizer input given (--input=file.txt,dir/,glob*)")
    for item in items:
        if not (glob.glob(item, recursive=True) if glob.has_magic(item) else os.path.exists(item)):
            raise FileNotFoundError(f"tokenizer input {item!r} matches no files")
    return items


def iter_documents(items, text_field="", stats=None):
    """Yield document strings through babyllama.readers; its record errors go to stats["read_errors"]."""
    errors = ReadErrors()
    if stats is not None:
        stats["read_errors"] = errors
    for doc in readers.iter_documents(input_items(items), text_field=text_field or None, errors=errors):
        yield doc["text"]


def iter_sentences(docs, max_sentence_length=max_sentence_length, max_chars=max_chars, stats=None):
    """Documents -> non-blank lines cut below max_sentence_length bytes, stopping after max_chars chars."""
    chunk = max(1, max_sentence_length // 4)  # a character is at most 4 UTF-8 bytes
    stats = {} if stats is None else stats
    stats.update(chars=0, sentences=0)
    for doc in docs:
        for line in doc.splitlines():
            if not line.strip():
                continue
            for i in range(0, len(line), chunk):
                piece = line[i:i + chunk]
                yield piece
                stats["chars"] += len(piece)
                stats["sentences"] += 1
                if stats["chars"] >= max_chars:
                    return


def sample_sentences(sentences, size, seed):
    """A uniform random sample of at most size sentences (reservoir sampling, Vitter's algorithm R), in stream order,
    with Python's seeded RNG: the same sample on every run and machine. sentencepiece's own sampling gave a different
    vocabulary on each run of the demo corpus (73 of 8,000 pieces) despite set_random_generator_seed."""
    rng = random.Random(seed)
    sample, order = [], []
    for n, s in enumerate(sentences):
        if n < size:
            sample.append(s)
            order.append(n)
        else:
            j = rng.randrange(n + 1)
            if j < size:
                sample[j], order[j] = s, n
    return [s for _, s in sorted(zip(order, sample))]


def _train(sentences, prefix, vocab_size, character_coverage, max_sentence_length, num_threads, verbose, **extra):
    """One sentencepiece BPE training run into prefix.model/.vocab; extra: more trainer options (required_chars)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=character_coverage, byte_fallback=True, split_digits=True,
        # identity + no dummy prefix + keep whitespace: what goes in comes back out, byte for byte
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) can become one piece
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        control_symbols=",".join(SPECIAL_TOKENS),
        max_sentence_length=max_sentence_length, input_sentence_size=0,  # sampled above, reproducibly
        shuffle_input_sentence=False, num_threads=num_threads, minloglevel=0 if verbose else 2, **extra)


def _has_space_piece(model_file):
    """Whether the model holds "▁" as a piece of its own (without it a space falls back to the bytes of "▁")."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    i = sp.piece_to_id(SPACE_MARK)
    return i != sp.unk_id() and not sp.is_byte(i)


def train_tokenizer(files_or_iterator, model_prefix=model_prefix, vocab_size=vocab_size, *,
                    max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
                    max_chars=max_chars, character_coverage=character_coverage, num_threads=num_threads,
                    text_field=text_field, seed=seed, verbose=False):
    """Train a BPE model; returns the path of <model_prefix>.model. files_or_iterator: comma-separated files/globs/dirs
    (str) or a list/tuple of paths; any other iterable is the documents themselves. Prints one summary line; verbose:
    sentencepiece's log and a sample tokenization too. ValueError (one line) for a vocab_size over uint16, under the
    fixed pieces, or over what the corpus allows (saying the largest it allows); ValueError, nothing written, for a
    space-free one-shot iterator with input_sentence_size=0 (it cannot be read twice)."""
    t0 = time.time()
    # check everything cheap before reading any data
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} does not fit: token files store ids as uint16, "
                         f"so vocab_size must be <= {MAX_VOCAB}")
    if vocab_size <= N_FIXED:
        raise ValueError(f"vocab_size={vocab_size} is too small: {N_FIXED} ids are fixed (<unk> <s> </s> <pad>, "
                         f"{len(SPECIAL_TOKENS)} chat/reserved tokens, 256 byte-fallback tokens) "
                         f"before any character or merge")
    stats = {}
    if isinstance(files_or_iterator, (str, os.PathLike, list, tuple)):
        spec = files_or_iterator if isinstance(files_or_iterator, (list, tuple)) else os.fspath(files_or_iterator)
        spec = input_items(spec)

        def read():  # the files can be read again, should training need a second pass
            return iter_sentences(iter_documents(spec, text_field, stats), max_sentence_length, max_chars, stats)
    else:
        docs = iter(files_or_iterator)
        read = None
    sentences = read() if read else iter_sentences(docs, max_sentence_length, max_chars, stats)
    first = next(sentences, None)
    if first is None:
        raise ValueError("tokenizer input holds no text")
    sentences = itertools.chain([first], sentences)
    if input_sentence_size:
        sample = sample_sentences(sentences, input_sentence_size, seed)
        read = functools.partial(iter, sample)
        sentences = read()

    os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp"  # no PID in it: the model file records its prefix, and its sha256 must repeat
    try:
        _train(sentences, tmp_prefix, vocab_size, character_coverage, max_sentence_length, num_threads, verbose)
        if not _has_space_piece(tmp_prefix + ".model"):
            # a corpus without (enough) spaces: "▁" fell outside the character coverage and a space would come back
            # as "▁". Train again with it required; only then, so that every other corpus gives the same file as before
            if read is None:
                raise ValueError("the tokenizer input has no (or too few) spaces, so training must read it twice to "
                                 "force the space piece in: give files, or set input_sentence_size > 0")
            _train(read(), tmp_prefix, vocab_size, character_coverage, max_sentence_length, num_threads, verbose,
                   required_chars=SPACE_MARK)
        if Tokenizer(tmp_prefix + ".model").kind != "ours":  # (ValueError if it does not load): nothing is written
            raise ValueError(f"the tokenizer trained into {tmp_prefix}.model does not round-trip every text")
        for ext in (".vocab", ".model"):  # .model last: if it is there, training finished
            os.replace(tmp_prefix + ext, model_prefix + ext)
    except RuntimeError as e:  # sentencepiece's "Vocabulary size too high (N). Please set it to a value <= M."
        largest = re.search(r"Vocabulary size too high.*<= (\d+)", str(e))
        if largest is None:
            raise
        raise ValueError(f"vocab_size={vocab_size} is too large for this corpus: it allows at most {largest[1]} "
                         f"pieces (set --vocab_size={largest[1]} or less, or train on more text)") from e
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)

    path = model_prefix + ".model"
    tok = Tokenizer(path)  # also checks that the model round-trips text
    if "read_errors" in stats and (verbose or stats["read_errors"].count):  # the records skipped: named with verbose
        print(stats["read_errors"].report() if verbose else f"input: {stats['read_errors'].brief()}")
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    n_bytes = sum(p.startswith("<0x") and p.endswith(">") and len(p) == 6 for p in pieces)
    n_merged = sum(len(p) > 1 and not (p.startswith("<") and p.endswith(">")) for p in pieces)
    print(f"tokenizer: {tok.vocab_size:,} pieces ({n_merged:,} of several characters, {n_bytes} byte fallbacks, "
          f"{N_FIXED - n_bytes} special) from {stats.get('chars', 0):,} characters in {stats.get('sentences', 0):,} "
          f"lines, {time.time() - t0:.1f} s -> {path} (sha256 {tok.sha256()[:12]})")
    if verbose:
        sample = "床前明月光，疑是地上霜。Hello, world! 2026年11月21日 👋"
        ids = tok.encode(sample)
        print(f"sample: {sample!r} -> {len(ids)} tokens")
        print(" ".join(tok.id_to_piece(i) for i in ids))
    return path


def main():
    """python -m tokenizer: train with the globals above, as the command line set them."""
    train_tokenizer(input, model_prefix, vocab_size, max_sentence_length=max_sentence_length,
                    input_sentence_size=input_sentence_size, max_chars=max_chars,
                    character_coverage=character_coverage, num_threads=num_threads,
                    text_field=text_field, seed=seed, verbose=verbose)
