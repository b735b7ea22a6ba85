"""The text perplexity is measured on (eval.py --mode=ppl), as token sequences with the characters and documents
they hold: a token file of data_process.py, or raw text documents."""
import numpy as np

from babyllama.readers import iter_documents
from babyllama.records import ReadErrors
from babyllama.token_files import open_bins


def ppl_bin(tok, path, vocab_size, tokenizer_sha256, max_tokens):
    """(sequences to score, characters, documents) of the first max_tokens tokens (0 = all) of a token file (its
    meta.json's dtype: uint16 or uint32), one sequence after an eos (documents are separated by eos, scored like every
    token, as in training). Checked as training checks it (token_files.open_bins) against the model's vocab_size and
    tokenizer sha256."""
    bins, paths, _ = open_bins(path, vocab_size, like={"tokenizer_sha256": tokenizer_sha256}, min_tokens=2)
    if len(bins) > 1:
        raise SystemExit(f"--mode=ppl evaluates one token file; {path!r} is {len(paths)}: {', '.join(paths)}")
    # the file's first document follows no eos: put one before it, as before every other, so all are scored
    data = bins[0][:max_tokens] if max_tokens else bins[0]
    seq = np.concatenate([[tok.eos_id], np.asarray(data, dtype=np.int64)])
    cuts = np.flatnonzero(seq[1:] == tok.eos_id) + 1  # the scored tokens, split into documents at eos
    n_chars = sum(len(tok.decode(part[part != tok.eos_id].tolist())) for part in np.split(seq[1:], cuts - 1))
    return [seq], n_chars, len(cuts)


def ppl_text(tok, path, text_field="", max_docs=0):
    """(sequences to score, characters, documents) of raw text (anything readers.py reads; text_field: the records'
    field, "" = auto), at most max_docs documents (0 = all), each as eos + tokens + eos (data_process.py's layout)."""
    errors = ReadErrors()
    seqs, n_chars = [], 0
    for doc in iter_documents([path], text_field=text_field or None, errors=errors):
        seqs.append([tok.eos_id] + tok.encode(doc["text"]) + [tok.eos_id])
        n_chars += len(doc["text"])
        if max_docs and len(seqs) >= max_docs:
            break
    if errors.count:
        print(errors.report())
    if not seqs:
        raise SystemExit(f"{path}: no document to score ({errors.brief()}); --mode=ppl reads a token file (.bin) "
                         f"or text documents (.txt, or .jsonl/.parquet with a text field: --text_field names it)")
    return seqs, n_chars, len(seqs)
