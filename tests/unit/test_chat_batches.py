"""babyllama/chat_batches.py: packed rows (block-diagonal mask, restarted positions) give the loss of padded
batches, and greedy packing never splits a sample."""
from conftest import CONVERSATIONS, tiny_model
import numpy as np

from babyllama import chat_batches
from tokenizer.chat_template import encode_conversation


def test_packed_rows_give_the_loss_of_padded_batches(tiny_tok):
    samples = [tuple(np.array(v) for v in encode_conversation(tiny_tok, c["messages"], c["system"]))
               for c in CONVERSATIONS]
    model = tiny_model(0, dim=32, vocab_size=tiny_tok.vocab_size, max_seq_len=128).eval()
    padded = chat_batches.collate_padded(samples, 0)
    loss_pad = model(padded["x"], padded["y"])[1]
    max_seq_len = sum(len(s[0]) for s in samples) + 4  # one row holding all four, plus padding
    packed = chat_batches.collate_packed([samples], max_seq_len, 0)
    assert packed["n_tokens"] == padded["n_tokens"]
    loss_packed = chat_batches.PackedLM(model)(packed["x"], packed["y"], packed["pos"], packed["mask"])[1]
    assert abs(loss_pad.item() - loss_packed.item()) <= 1e-5
    # without the block-diagonal mask and restarted positions the samples would see each other
    leaky = model(packed["x"], packed["y"])[1]
    assert abs(leaky.item() - loss_pad.item()) > 1e-4
    # greedy packing never splits a sample and respects the row length
    rows = chat_batches.pack_rows(range(len(samples)), [len(s[0]) for s in samples], 39)  # rows of <= 40 tokens
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3]
    assert all(sum(len(samples[i][0]) for i in r) <= 40 or len(r) == 1 for r in rows)
