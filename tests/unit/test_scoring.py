"""babyllama/scoring.py, log-probs for multiple choice and perplexity: letter and option scoring against rigged
models (a head that ignores its input), the prompts that lost shots or were cut counted, the prefix caches equal
to sending every prompt whole, the accuracy of transformers' LlamaForCausalLM on the exported weights, and sliding
windows that score every token once with enough context."""
from conftest import QUESTIONS, spread_weights_, tiny_model, write_csv, write_exam
import numpy as np
import pytest
import torch
import torch.nn as nn

from babyllama.mc import LETTERS, encode_pieces, letter_ids, load_exam
from babyllama.scoring import prefix_groups, prefix_kv, score_mc, sequence_loss, sliding_windows, token_logprobs


def scoring_model(tok, seed=0, max_seq_len=256):
    """A tiny model for tok's vocabulary with spread weights: its predictions are not near-ties."""
    model = tiny_model(seed, dim=32, vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
    return spread_weights_(model, seed, std=0.3).eval()


class FixedHead(nn.Module):
    """An output layer that ignores the hidden state: the same logits w at every position."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, h):
        return self.w.to(h.dtype).expand(*h.shape[:-1], self.w.numel())


def rigged(tok, w):
    m = scoring_model(tok)
    m.output = FixedHead(w)
    return m


# ---- multiple choice ------------------------------------------------------------------------------------------

def test_letter_scoring_picks_the_letter_the_rigged_model_prefers(tiny_tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path)), "val")
    for favourite in "ABCD":
        w = torch.zeros(tiny_tok.vocab_size)
        w[letter_ids(tiny_tok)[LETTERS.index(favourite)]] = 5.0
        correct, preds, _ = score_mc(rigged(tiny_tok, w), tiny_tok, exam, {}, False, 0, ["letter"], 4, "cpu")
        # the model answers `favourite` to every question: right exactly where that is the answer
        expected = [a == favourite for _, _, a in QUESTIONS]
        assert correct["letter"]["poems"] == expected and correct["letter"]["authors"] == expected
        assert {p["prediction"] for p in preds} == {favourite}


def test_option_scoring_divides_by_characters_not_by_tokens(tiny_tok, tmp_path):
    # one token per character for these: "明" strongly preferred (log p = a), "白" less (log p = b)
    for ch in "明白":
        assert len(tiny_tok.encode(ch)) == 1
    w = torch.zeros(tiny_tok.vocab_size)
    w[tiny_tok.encode("明")[0]], w[tiny_tok.encode("白")[0]] = 4.0, 3.0
    lse = torch.logsumexp(w, 0).item()
    a, b = 4.0 - lse, 3.0 - lse
    # option A: one "白" (sum b, per char b); option B: "明明明" (sum 3a, per char a); C, D: a rare token
    rows = [(0, "哪个", "白", "明明明", "？", "！", "B"), (1, "哪个", "白", "明明明", "？", "！", "A")]
    exam = load_exam(str(write_csv(tmp_path / "val" / "x_val.csv", rows).parent.parent), "val")
    assert 3 * a < b < a  # the sum prefers "白", the per-character mean prefers "明明明"
    correct, preds, _ = score_mc(rigged(tiny_tok, w), tiny_tok, exam, {}, False, 0, ["option"], 8, "cpu")
    assert correct["option"]["x"] == [True, False]
    assert preds[0]["scores"][:2] == pytest.approx([b, a], abs=1e-3)


def test_chat_prompts_score_the_same_way(tiny_tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path)), "val", k_shot=2)
    w = torch.zeros(tiny_tok.vocab_size)
    w[letter_ids(tiny_tok)[2]] = 5.0  # C
    correct, _, _ = score_mc(rigged(tiny_tok, w), tiny_tok, exam, {}, True, 2, ["letter"], 3, "cpu")
    assert correct["letter"]["poems"] == [a == "C" for _, _, a in QUESTIONS]


def test_mc_counts_the_prompts_that_lost_shots_or_were_cut(tiny_tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path, n_dev=5)), "val", k_shot=5)
    model = scoring_model(tiny_tok, max_seq_len=48)
    _, _, stats = score_mc(model, tiny_tok, exam, {}, False, 5, ["letter", "option"], 8, "cpu")
    assert stats["letter"]["fewer_shots"] == 10  # no 5-shot prompt fits 48 tokens
    assert stats["option"]["fewer_shots"] == 10
    # 12 tokens hold not even the instruction: every prompt loses its shots and is cut
    head, _, _ = encode_pieces(tiny_tok, "poems", [], exam["poems"]["questions"][0], False)
    assert len(head) > 12
    _, _, stats = score_mc(scoring_model(tiny_tok, max_seq_len=12), tiny_tok, exam, {}, False, 5, ["letter"], 8, "cpu")
    assert stats["letter"] == {"fewer_shots": 10, "truncated": 10}


def test_prefix_cache_gives_the_logprobs_of_the_whole_prompt(tiny_tok):
    model = scoring_model(tiny_tok, seed=3)
    prefix = list(range(5, 45))
    rows = [[7, 8, 9, 10], [11, 12], [13, 14, 15]]
    starts = [40, 25, 40]  # the second row continues only the first 25 tokens of the prefix (fewer shots)
    targets = [(b, t, 20 + t) for b, r in enumerate(rows) for t in range(len(r))]
    cached = token_logprobs(model, rows, targets, "cpu", len(prefix), prefix_kv(model, prefix, "cpu"), starts)
    whole = token_logprobs(model, [prefix[:p] + r for p, r in zip(starts, rows)],
                           [(b, starts[b] + t, x) for b, t, x in targets], "cpu")
    logits = model(torch.tensor([prefix + rows[0]]))[0][0].log_softmax(-1)  # the plain training forward
    assert cached == pytest.approx(whole, abs=1e-4)
    assert cached[:4] == pytest.approx([logits[len(prefix) + t, 20 + t].item() for t in range(4)], abs=1e-4)


def test_cached_scoring_equals_sending_every_prompt_whole(tiny_tok, tmp_path):
    # long shots, a context that keeps 1 to 3 of them: the subject's cache, read in part by prompts with fewer
    # shots, and the question cached once for its four options must give the plain path's numbers
    d = tmp_path / "e"
    write_csv(d / "val" / "s_val.csv", [(i, q * (1 + i % 3), *o, a) for i, (q, o, a) in enumerate(QUESTIONS)])
    write_csv(d / "dev" / "s_dev.csv", [(i, "样例" + "床前明月光" * 3 + str(i), "甲", "乙", "丙", "丁", "A")
                                        for i in range(3)])
    exam = load_exam(str(d), "val", k_shot=3)
    model = scoring_model(tiny_tok, seed=5, max_seq_len=150)
    for chat in (False, True):
        runs = [score_mc(model, tiny_tok, exam, {}, chat, 3, ["letter", "option"], bs, "cpu", use_prefix_cache=cache)
                for bs, cache in ((1, False), (3, True), (8, True))]
        shots = {p["shots"] for p in runs[0][1]}
        assert len(shots) > 1  # some prompts kept fewer shots than others
        for _, preds, _ in runs[1:]:
            for a, b in zip(runs[0][1], preds):
                assert (a["prediction"], a["shots"]) == (b["prediction"], b["shots"])
                assert a["scores"] == pytest.approx(b["scores"], abs=2e-4)


def test_prompts_with_fewer_shots_share_their_subjects_prefix_cache():
    full, other = list(range(100)), list(range(200, 260))
    units = [{"prefix": full}, {"prefix": full[:60]}, {"prefix": full[:10]}, {"prefix": other}, {"prefix": []}]
    groups = prefix_groups(units, True)
    assert groups[tuple(full)] == units[:2] and groups[tuple(other)] == [units[3]]
    assert groups[()] == [units[2], units[4]]  # shorter than MIN_PREFIX: not worth a cache
    assert prefix_groups(units, False) == {(): units}


def test_mc_accuracy_equals_transformers_llama_on_the_exported_weights(tiny_tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from babyllama.hf import hf_config_dict, to_hf_state_dict
    model = scoring_model(tiny_tok, seed=1)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.args))).float().eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    exam = load_exam(str(write_exam(tmp_path)), "val", k_shot=2)
    correct, preds, _ = score_mc(model, tiny_tok, exam, {}, False, 2, ["letter", "option"], 5, "cpu")
    letters = letter_ids(tiny_tok)
    ours = {(p["subject"], p["id"], p["scoring"]): p["prediction"] for p in preds}
    our_scores = {(p["subject"], p["id"], p["scoring"]): p["scores"] for p in preds}
    n_right = {"letter": 0, "option": 0}
    for subject, part in exam.items():
        for q in part["questions"]:
            # the prompts as documented (eos, instruction, shots, question, cue), scored by the HF model
            for scoring in ("letter", "option"):
                head, shots, question = encode_pieces(tiny_tok, subject, part["shots"][:2], q, False,
                                                      scoring == "option")
                prompt = head + sum(shots, []) + question
                with torch.no_grad():
                    if scoring == "letter":
                        lp = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
                        scores = [lp[i].item() for i in letters]
                    else:
                        scores = []
                        for o in q["options"]:
                            ids = tiny_tok.encode(o)
                            lp = hf(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                            scores.append(sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)) / len(o))
                pick = LETTERS[int(np.argmax(scores))]
                assert ours[(subject, q["id"], scoring)] == pick
                assert our_scores[(subject, q["id"], scoring)] == pytest.approx(scores, abs=2e-4)
                n_right[scoring] += pick == q["answer"]
    for scoring in ("letter", "option"):
        assert sum(sum(c) for c in correct[scoring].values()) == n_right[scoring]



# ---- perplexity -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,T,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (11, 4, 3), (100, 16, 8)])
def test_sliding_windows_score_every_token_once_with_enough_context(n, T, stride):
    scored = []
    for i, (start, length, skip) in enumerate(sliding_windows(n, T, stride)):
        assert length <= T
        targets = list(range(start + 1 + skip, start + length + 1))
        scored += targets
        if i:  # every token after the first window sees at least T - stride earlier tokens
            assert all(t - start >= T - stride for t in targets)
    assert scored == list(range(1, n))


def test_sliding_window_loss_equals_the_full_forward_when_it_fits(tiny_tok):
    model = scoring_model(tiny_tok, seed=2, max_seq_len=32)
    seq = torch.randint(4, tiny_tok.vocab_size, (30,))
    total, n = sequence_loss(model, [seq.tolist()], 7, 4, "cpu")
    logits = model(seq[None, :-1])[0][0]
    assert n == 29 and total == pytest.approx(nn.functional.cross_entropy(logits, seq[1:], reduction="sum").item(),
                                              rel=1e-4)


def test_stride_1_predicts_every_token_from_the_last_context_tokens(tiny_tok):
    # with stride 1, token j is predicted from exactly tokens[max(0, j - T):j]: one forward per token, by hand
    T = 8
    model = scoring_model(tiny_tok, seed=4, max_seq_len=T)
    seqs = [torch.randint(4, tiny_tok.vocab_size, (n,)) for n in (30, 5, 9)]
    total, n = sequence_loss(model, [s.tolist() for s in seqs], 1, 3, "cpu")
    expected = 0.0
    for s in seqs:
        for j in range(1, len(s)):
            ctx = s[max(0, j - T):j]
            expected -= model(ctx[None])[0][0, -1].log_softmax(-1)[s[j]].item()
    assert n == 29 + 4 + 8 and total == pytest.approx(expected, rel=1e-4)

