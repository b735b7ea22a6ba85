"""eval.py's measurements: multiple choice (C-Eval / CMMLU layouts) scored by letter and by option text against
rigged models and against transformers' LlamaForCausalLM, k-shot prompts, category averages, perplexity and bits
per character, BLEU/ROUGE-L against hand-computed values, contamination, the poetry benchmark, bad input."""
import csv
import json
import math
import random

from conftest import run_script
import numpy as np
import pytest
from sft_fixtures import tiny_tokenizer
import torch
import torch.nn as nn

from babyllama import text_metrics
from babyllama.models import save_merged
from babyllama.contamination import find_contamination, flagged
from babyllama.mc import LETTERS, MCError, encode_pieces, fit_prompt, letter_ids, load_exam, read_questions, summarize
from babyllama.scoring import prefix_kv, score_mc, sequence_loss, sliding_windows, token_logprobs
from babyllama.split import is_val
from model import ModelArgs, Transformer

# ---- fixtures -------------------------------------------------------------------------------------------------

QUESTIONS = [  # (question, options, answer): hand-written, short, characters the tiny tokenizer knows
    ("床前明月光的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "A"),
    ("白日依山尽的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "B"),
    ("春眠不觉晓的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "C"),
    ("夜来风雨声的下一句", ["疑是地上霜", "黄河入海流", "处处闻啼鸟", "花落知多少"], "D"),
    ("静夜思的作者是谁", ["李白", "王之涣", "孟浩然", "助手"], "A"),
]


def write_csv(path, rows, header=("id", "question", "A", "B", "C", "D", "answer")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_exam(d, subjects=("poems", "authors"), n_dev=3):
    """<d>/val/<subject>_val.csv and <d>/dev/<subject>_dev.csv; dev questions carry a marker naming them."""
    for s in subjects:
        write_csv(d / "val" / f"{s}_val.csv", [(i, q, *o, a) for i, (q, o, a) in enumerate(QUESTIONS)])
        write_csv(d / "dev" / f"{s}_dev.csv", [(i, f"{s}样例{i}号", "甲", "乙", "丙", "丁", "ABCD"[i % 4])
                                                for i in range(n_dev)])
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_model(tok, seed=0, max_seq_len=256):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                              max_seq_len=max_seq_len, multiple_of=16))
    with torch.no_grad():  # spread the logits, so predictions are not near-ties
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    return m.eval()


class FixedHead(nn.Module):
    """An output layer that ignores the hidden state: the same logits w at every position."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, h):
        return self.w.to(h.dtype).expand(*h.shape[:-1], self.w.numel())


def rigged(tok, w):
    m = tiny_model(tok)
    m.output = FixedHead(w)
    return m


# ---- multiple choice ------------------------------------------------------------------------------------------

def test_letter_scoring_picks_the_letter_the_rigged_model_prefers(tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path)), "val")
    for favourite in "ABCD":
        w = torch.zeros(tok.vocab_size)
        w[letter_ids(tok)[LETTERS.index(favourite)]] = 5.0
        correct, preds, _ = score_mc(rigged(tok, w), tok, exam, {}, False, 0, ["letter"], 4, "cpu")
        # the model answers `favourite` to every question: right exactly where that is the answer
        expected = [a == favourite for _, _, a in QUESTIONS]
        assert correct["letter"]["poems"] == expected and correct["letter"]["authors"] == expected
        assert {p["prediction"] for p in preds} == {favourite}


def test_option_scoring_divides_by_characters_not_by_tokens(tok, tmp_path):
    # one token per character for these: "明" strongly preferred (log p = a), "白" less (log p = b)
    for ch in "明白":
        assert len(tok.encode(ch)) == 1
    w = torch.zeros(tok.vocab_size)
    w[tok.encode("明")[0]], w[tok.encode("白")[0]] = 4.0, 3.0
    lse = torch.logsumexp(w, 0).item()
    a, b = 4.0 - lse, 3.0 - lse
    # option A: one "白" (sum b, per char b); option B: "明明明" (sum 3a, per char a); C, D: a rare token
    rows = [(0, "哪个", "白", "明明明", "？", "！", "B"), (1, "哪个", "白", "明明明", "？", "！", "A")]
    exam = load_exam(str(write_csv(tmp_path / "val" / "x_val.csv", rows).parent.parent), "val")
    assert 3 * a < b < a  # the sum prefers "白", the per-character mean prefers "明明明"
    correct, preds, _ = score_mc(rigged(tok, w), tok, exam, {}, False, 0, ["option"], 8, "cpu")
    assert correct["option"]["x"] == [True, False]
    assert preds[0]["scores"][:2] == pytest.approx([b, a], abs=1e-3)


def test_chat_prompts_score_the_same_way(tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path)), "val", k_shot=2)
    w = torch.zeros(tok.vocab_size)
    w[letter_ids(tok)[2]] = 5.0  # C
    correct, _, _ = score_mc(rigged(tok, w), tok, exam, {}, True, 2, ["letter"], 3, "cpu")
    assert correct["letter"]["poems"] == [a == "C" for _, _, a in QUESTIONS]


def test_k_shot_prompts_hold_k_dev_examples_of_the_subject_and_never_the_question(tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path, n_dev=4)), "val", k_shot=3)
    for chat in (False, True):
        head, shots, question = encode_pieces(tok, "诗", exam["poems"]["shots"][:3], exam["poems"]["questions"][0],
                                              chat)
        prefix, suffix, k, cut = fit_prompt(head, shots, question, 1000)
        text = tok.decode(prefix + suffix)
        assert (k, cut) == (3, False)
        assert [text.count(f"poems样例{i}号") for i in range(4)] == [1, 1, 1, 0]
        assert "authors样例" not in text and text.count(QUESTIONS[0][0]) == 1
    # scoring the dev split itself with its own shots: a question is never its own example
    dev = load_exam(str(tmp_path), "dev", "dev", k_shot=3)
    from babyllama.mc import shots_for
    q = dev["poems"]["questions"][1]
    chosen = shots_for(q, dev["poems"]["shots"], 3)
    assert len(chosen) == 3 and q not in chosen


def test_long_prompts_drop_shots_before_truncating_from_the_left(tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path, n_dev=3)), "val", k_shot=3)
    q = exam["poems"]["questions"][0]
    head, shots, question = encode_pieces(tok, "诗", exam["poems"]["shots"], q, False)
    full = len(head) + sum(map(len, shots)) + len(question)
    prefix, suffix, k, cut = fit_prompt(head, shots, question, full - 1)  # one token short: the last shot goes
    assert (k, cut) == (2, False) and prefix == head + shots[0] + shots[1] and suffix == question
    prefix, suffix, k, cut = fit_prompt(head, shots, question, len(head) + len(question))  # exactly 0-shot
    assert (k, cut) == (0, False)
    prefix, suffix, k, cut = fit_prompt(head, shots, question, len(question) - 2)  # even 0-shot is too long
    assert (k, cut) == (0, True) and prefix == [] and suffix == question[2:]


def test_mc_counts_the_prompts_that_lost_shots_or_were_cut(tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path, n_dev=5)), "val", k_shot=5)
    model = tiny_model(tok, max_seq_len=48)
    _, _, stats = score_mc(model, tok, exam, {}, False, 5, ["letter", "option"], 8, "cpu")
    assert stats["letter"]["fewer_shots"] == 10  # no 5-shot prompt fits 48 tokens
    assert stats["option"]["fewer_shots"] == 10
    # 12 tokens hold not even the instruction: every prompt loses its shots and is cut
    head, _, _ = encode_pieces(tok, "poems", [], exam["poems"]["questions"][0], False)
    assert len(head) > 12
    _, _, stats = score_mc(tiny_model(tok, max_seq_len=12), tok, exam, {}, False, 5, ["letter"], 8, "cpu")
    assert stats["letter"] == {"fewer_shots": 10, "truncated": 10}


def test_category_averages_are_means_over_their_subjects():
    subjects = {"a": {"categories": ["STEM"], "hard": True}, "b": {"categories": ["STEM"]},
                "c": {"categories": ["Humanities", "China specific"]}}
    s = summarize({"a": [True, False], "b": [True, True, True, False], "c": [False, False, False, True, True]},
                  subjects)
    assert s["subjects"] == {"a": 0.5, "b": 0.75, "c": 0.4}
    assert s["categories"] == pytest.approx({"STEM": 0.625, "Humanities": 0.4, "China specific": 0.4})
    assert s["average"] == pytest.approx((0.5 + 0.75 + 0.4) / 3)  # over subjects, not the 11 questions
    assert s["average_hard"] == 0.5 and s["questions"] == 11


def test_prefix_cache_gives_the_logprobs_of_the_whole_prompt(tok):
    model = tiny_model(tok, seed=3)
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


def test_cached_scoring_equals_sending_every_prompt_whole(tok, tmp_path):
    # long shots, a context that keeps 1 to 3 of them: the subject's cache, read in part by prompts with fewer
    # shots, and the question cached once for its four options must give the plain path's numbers
    d = tmp_path / "e"
    write_csv(d / "val" / "s_val.csv", [(i, q * (1 + i % 3), *o, a) for i, (q, o, a) in enumerate(QUESTIONS)])
    write_csv(d / "dev" / "s_dev.csv", [(i, "样例" + "床前明月光" * 3 + str(i), "甲", "乙", "丙", "丁", "A")
                                        for i in range(3)])
    exam = load_exam(str(d), "val", k_shot=3)
    model = tiny_model(tok, seed=5, max_seq_len=150)
    for chat in (False, True):
        runs = [score_mc(model, tok, exam, {}, chat, 3, ["letter", "option"], bs, "cpu", use_prefix_cache=cache)
                for bs, cache in ((1, False), (3, True), (8, True))]
        shots = {p["shots"] for p in runs[0][1]}
        assert len(shots) > 1  # some prompts kept fewer shots than others
        for _, preds, _ in runs[1:]:
            for a, b in zip(runs[0][1], preds):
                assert (a["prediction"], a["shots"]) == (b["prediction"], b["shots"])
                assert a["scores"] == pytest.approx(b["scores"], abs=2e-4)


def test_prompts_with_fewer_shots_share_their_subjects_prefix_cache():
    from babyllama.scoring import prefix_groups
    full, other = list(range(100)), list(range(200, 260))
    units = [{"prefix": full}, {"prefix": full[:60]}, {"prefix": full[:10]}, {"prefix": other}, {"prefix": []}]
    groups = prefix_groups(units, True)
    assert groups[tuple(full)] == units[:2] and groups[tuple(other)] == [units[3]]
    assert groups[()] == [units[2], units[4]]  # shorter than MIN_PREFIX: not worth a cache
    assert prefix_groups(units, False) == {(): units}


def test_mc_accuracy_equals_transformers_llama_on_the_exported_weights(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from babyllama.hf import hf_config_dict, to_hf_state_dict
    model = tiny_model(tok, seed=1)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(model.args))).float().eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    exam = load_exam(str(write_exam(tmp_path)), "val", k_shot=2)
    correct, preds, _ = score_mc(model, tok, exam, {}, False, 2, ["letter", "option"], 5, "cpu")
    letters = letter_ids(tok)
    ours = {(p["subject"], p["id"], p["scoring"]): p["prediction"] for p in preds}
    our_scores = {(p["subject"], p["id"], p["scoring"]): p["scores"] for p in preds}
    n_right = {"letter": 0, "option": 0}
    for subject, part in exam.items():
        for q in part["questions"]:
            # the prompts as documented (eos, instruction, shots, question, cue), scored by the HF model
            for scoring in ("letter", "option"):
                head, shots, question = encode_pieces(tok, subject, part["shots"][:2], q, False, scoring == "option")
                prompt = head + sum(shots, []) + question
                with torch.no_grad():
                    if scoring == "letter":
                        lp = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
                        scores = [lp[i].item() for i in letters]
                    else:
                        scores = []
                        for o in q["options"]:
                            ids = tok.encode(o)
                            lp = hf(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                            scores.append(sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)) / len(o))
                pick = LETTERS[int(np.argmax(scores))]
                assert ours[(subject, q["id"], scoring)] == pick
                assert our_scores[(subject, q["id"], scoring)] == pytest.approx(scores, abs=2e-4)
                n_right[scoring] += pick == q["answer"]
    for scoring in ("letter", "option"):
        assert sum(sum(c) for c in correct[scoring].values()) == n_right[scoring]


def test_bad_mc_files_name_the_file_and_row(tmp_path):
    bad = write_csv(tmp_path / "a_val.csv", [(0, "问", "1", "2", "3", "4")], header=("id", "question", "A", "B", "C", "D"))
    with pytest.raises(MCError, match=r"a_val\.csv, row 1 \(header\): missing column 'answer'"):
        read_questions(str(bad))
    bad = write_csv(tmp_path / "b_val.csv", [(0, "问", "1", "2", "3", "4", "A"), (1, "问", "1", "2", "3", "4", "E")])
    with pytest.raises(MCError, match=r"b_val\.csv, row 3: answer 'E' is not one of A, B, C, D"):
        read_questions(str(bad))
    bad = write_csv(tmp_path / "m_val.csv", [(0, "第一行\n第二行\n第三行", "1", "2", "3", "4", "A"),
                                              (1, "问", "1", "2", "3", "4", "AB")])
    with pytest.raises(MCError, match=r"m_val\.csv, row 3 \(line 5\): answer 'AB' is not one of A, B, C, D"):
        read_questions(str(bad))  # a question over three lines: the record is row 3, it starts on line 5
    cmmlu = write_csv(tmp_path / "c" / "test" / "x.csv", [(0, "问", "1", "2", "3", "4", "b")],
                      header=("", "Question", "A", "B", "C", "D", "Answer"))
    assert read_questions(str(cmmlu))[0]["answer"] == "B"  # the CMMLU layout, lower-case answer accepted
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(MCError, match="empty: no val questions"):
        load_exam(str(tmp_path / "empty"), "val")
    header_only = write_csv(tmp_path / "h" / "val" / "s_val.csv", [])
    with pytest.raises(MCError, match=r"s_val\.csv: no questions"):
        load_exam(str(header_only.parent.parent), "val")


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


def test_sliding_window_loss_equals_the_full_forward_when_it_fits(tok):
    model = tiny_model(tok, seed=2, max_seq_len=32)
    seq = torch.randint(4, tok.vocab_size, (30,))
    total, n = sequence_loss(model, [seq.tolist()], 7, 4, "cpu")
    logits = model(seq[None, :-1])[0][0]
    assert n == 29 and total == pytest.approx(nn.functional.cross_entropy(logits, seq[1:], reduction="sum").item(),
                                              rel=1e-4)


def test_stride_1_predicts_every_token_from_the_last_context_tokens(tok):
    # with stride 1, token j is predicted from exactly tokens[max(0, j - T):j]: one forward per token, by hand
    T = 8
    model = tiny_model(tok, seed=4, max_seq_len=T)
    seqs = [torch.randint(4, tok.vocab_size, (n,)) for n in (30, 5, 9)]
    total, n = sequence_loss(model, [s.tolist() for s in seqs], 1, 3, "cpu")
    expected = 0.0
    for s in seqs:
        for j in range(1, len(s)):
            ctx = s[max(0, j - T):j]
            expected -= model(ctx[None])[0][0, -1].log_softmax(-1)[s[j]].item()
    assert n == 29 + 4 + 8 and total == pytest.approx(expected, rel=1e-4)


def save_tiny_ckpt(tok, path):
    model = tiny_model(tok, max_seq_len=16)
    save_merged(str(path), model, iter_num=0, config={}, tokenizer=tok.model_path, tokenizer_sha256=tok.sha256())
    return model


def test_ppl_on_text_reports_bits_per_character_from_loss_tokens_and_characters(tok, tmp_path):
    save_tiny_ckpt(tok, tmp_path / "ckpt.pt")
    docs = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽", "What is two plus two?"]
    (tmp_path / "t.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    run_script("eval.py", "--mode=ppl", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--val_data={tmp_path / 't.txt'}",
               "--stride=5", f"--results_file={tmp_path / 'r.json'}")
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert r["characters"] == sum(len(d) for d in docs) == 24 + 5 + 21
    assert r["val_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)  # each token and the closing eos
    assert r["bits_per_char"] == pytest.approx(r["val_loss"] * r["val_tokens"] / (r["characters"] * math.log(2)))
    assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))


def test_ppl_on_a_token_file_counts_the_characters_of_its_documents(tok, tmp_path):
    save_tiny_ckpt(tok, tmp_path / "ckpt.pt")
    docs = ["床前明月光", "疑是地上霜。", "Hello!"]
    ids = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "tokenizer_sha256": tok.sha256()}))
    run_script("eval.py", "--mode=ppl", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--val_data={tmp_path / 'val.bin'}",
               "--val_max_tokens=0", f"--results_file={tmp_path / 'r.json'}")
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    # every token is scored (the first after an eos, as data_process's documents are; the eos closing each
    # document too); the characters are the texts'
    assert r["val_tokens"] == len(ids) and r["characters"] == 5 + 6 + 6 and r["documents"] == 3


# ---- BLEU and ROUGE-L against hand-computed values --------------------------------------------------------------

def test_bleu_and_rouge_of_identical_strings_are_100():
    s = text_metrics.corpus_scores(["床前明月光", "the cat sat on the mat"], ["床前明月光", "the cat sat on the mat"])
    assert [s[f"bleu{n}"] for n in range(1, 5)] == pytest.approx([100] * 4) and s["rougeL"] == pytest.approx(100)


def test_bleu_and_rouge_without_overlap_are_0():
    s = text_metrics.corpus_scores(["春眠不觉晓"], ["黄河入海流"])
    assert [s[f"bleu{n}"] for n in range(1, 5)] == [0, 0, 0, 0] and s["rougeL"] == 0


def test_bleu_brevity_penalty_on_a_short_hypothesis():
    # every n-gram of the 4-character hypothesis is in the 5-character reference: precisions 1, BP = e^(1 - 5/4)
    s = text_metrics.corpus_scores(["床前明月"], ["床前明月光"])
    for n in range(1, 5):
        assert s[f"bleu{n}"] == pytest.approx(100 * math.exp(1 - 5 / 4), abs=1e-6)
    # ROUGE-L: LCS 4, precision 4/4, recall 4/5 -> F1 = 2 * 1 * 0.8 / 1.8
    assert s["rougeL"] == pytest.approx(100 * 2 * 0.8 / 1.8)


def test_bleu_precisions_and_rouge_lcs_by_hand():
    # hypothesis 床前光明月 vs reference 床前明月光: unigrams 5/5, bigrams {床前, 前光, 光明, 明月} vs ref
    # {床前, 前明, 明月, 月光}: 2/4; equal lengths so BP = 1. BLEU-2 = sqrt(1 * 0.5).
    s = text_metrics.corpus_scores(["床前光明月"], ["床前明月光"])
    assert s["bleu1"] == pytest.approx(100) and s["bleu2"] == pytest.approx(100 * math.sqrt(0.5))
    # trigrams: 床前光, 前光明, 光明月 vs 床前明, 前明月, 明月光: 0 matches -> unsmoothed BLEU-3 = 0
    assert s["bleu3"] == 0
    assert s["rougeL"] == pytest.approx(80.0)  # LCS 床前明月 = 4 of 5 both ways
    # English is scored by words: 3 of 6 reference words, all hypothesis words match
    e = text_metrics.corpus_scores(["the cat sat"], ["the cat sat on the mat"])
    assert e["lang"] == "en" and e["bleu1"] == pytest.approx(100 * math.exp(1 - 6 / 3))
    assert e["rougeL"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)


def test_empty_hypothesis_scores_0():
    s = text_metrics.corpus_scores([""], ["床前明月光"])
    assert [s[f"bleu{n}"] for n in range(1, 5)] == [0, 0, 0, 0] and s["rougeL"] == 0
    assert text_metrics.sample_scores("", "床前明月光", "zh") == {"bleu1": 0, "bleu2": 0, "bleu3": 0, "bleu4": 0,
                                                                 "rougeL": 0}


def test_gen_mode_writes_scores_and_per_sample_rows(tok, tmp_path):
    save_tiny_ckpt(tok, tmp_path / "ckpt.pt")
    items = [{"prompt": "床前明月光，", "reference": "疑是地上霜。"},
             {"messages": [{"role": "user", "content": "你好"}], "reference": "你好，我是助手。"}, {"bad": 1},
             {"messages": ["你好"], "reference": "x"}, {"messages": [{"role": "assistant", "content": "a"}], "reference": "x"}]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(i, ensure_ascii=False) for i in items), encoding="utf-8")
    p = run_script("eval.py", "--mode=gen", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--gen_file={tmp_path / 'g.jsonl'}",
                   "--max_new_tokens=4", "--temperature=0.0", f"--results_file={tmp_path / 'r.json'}")
    assert "g.jsonl:3: no prompt/messages or reference" in p.stdout
    assert "g.jsonl:4: bad messages" in p.stdout and "g.jsonl:5: bad messages" in p.stdout
    r = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in open(r["samples"], encoding="utf-8")]
    assert len(rows) == 2 and {"bleu4", "rougeL", "answer"} <= set(rows[0])
    again = text_metrics.corpus_scores([x["answer"] for x in rows], [x["reference"] for x in rows])
    assert r["scores"] == pytest.approx(again)
    assert "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L |" in r["markdown"]


# ---- contamination --------------------------------------------------------------------------------------------

def test_contamination_finds_a_planted_near_duplicate_and_not_a_reordered_text():
    items = [{"key": "q1", "text": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"},
             {"key": "q2", "text": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"},
             {"key": "q3", "text": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"}]
    shuffled = list("白日依山尽黄河入海流欲穷千里目更上一层楼")
    random.Random(0).shuffle(shuffled)
    docs = [{"text": "静夜思\n李白\n床前明月光，疑似地上霜。举头望明月，低头思故乡。", "source": "a.txt", "line": 7},
            {"text": "".join(shuffled), "source": "b.txt", "line": 1},
            {"text": "另一首不相干的诗在这里，没有一句相同。", "source": "c.txt", "line": 2}]
    best, n = find_contamination(items, iter(docs), chunk=2)
    hits = flagged(items, best, 0.5)
    assert n == 3 and [h["key"] for h in hits] == ["q1"] and (hits[0]["source"], hits[0]["line"]) == ("a.txt", 7)
    # one character changed (是 -> 似) loses the 5 shingles that cover it: 11 of the 16 remain
    assert hits[0]["containment"] == pytest.approx(11 / 16)
    assert best[1]["containment"] == 0 and best[2]["containment"] == 0


def test_contamination_mode_flags_items_and_mc_counts_them(tok, tmp_path):
    d = write_exam(tmp_path / "exam", subjects=("poems",))
    corpus = tmp_path / "train.txt"
    corpus.write_text("白日依山尽的下一句\n疑是地上霜\n黄河入海流\n处处闻啼鸟\n花落知多少\n无关的一行字\n", encoding="utf-8")
    run_script("contamination.py", f"--eval_set={d}", f"--train_data={corpus}", "--threshold=0.3")
    r = json.loads((d / "contamination.json").read_text(encoding="utf-8"))
    assert r["items"] == 5 and r["training_documents"] == 6
    # a one-line document holds at most the question's 5 shingles of an item's 25: none flagged
    assert r["flagged"] == 0
    corpus.write_text("白日依山尽的下一句：疑是地上霜，黄河入海流，处处闻啼鸟，花落知多少\n", encoding="utf-8")
    run_script("contamination.py", f"--eval_set={d}", f"--train_data={corpus}", "--threshold=0.9")
    r = json.loads((d / "contamination.json").read_text(encoding="utf-8"))
    assert [h["key"] for h in r["flagged_items"]] == ["poems/1"]
    save_tiny_ckpt(tok, tmp_path / "ckpt.pt")
    run_script("eval.py", "--mode=mc", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--mc_data={d}",
               f"--contamination_file={d / 'contamination.json'}", f"--results_file={tmp_path / 'mc.json'}")
    mc = json.loads((tmp_path / "mc.json").read_text(encoding="utf-8"))
    assert mc["contaminated"] == 1 and "1 of 5 questions have a near-duplicate" in mc["markdown"]


def test_mc_mode_refuses_a_bad_file_before_loading_a_model(tmp_path):
    write_csv(tmp_path / "x" / "val" / "s_val.csv", [(0, "问", "1", "2", "3", "4", "5")])
    p = run_script("eval.py", "--mode=mc", "--ckpt_path=/nonexistent/ckpt.pt", f"--mc_data={tmp_path / 'x'}",
                   check=False)
    assert p.returncode != 0 and "s_val.csv, row 2: answer '5' is not one of A, B, C, D" in p.stderr


# ---- the poetry benchmark -----------------------------------------------------------------------------------

def test_poetry_benchmark_uses_only_held_out_poems(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    chars = "春夏秋冬山水风月花鸟云雨天地江河日夜人心"
    rows = []
    for i in range(400):
        lines = ["".join(rng.choice(chars) for _ in range(5)) + "，" + "".join(rng.choice(chars) for _ in range(5)) + "。"
                 for _ in range(4)]
        title, author = f"题{i}", f"诗人{i % 9}"
        rows.append({"text": "\n".join([title, author] + lines), "title": title, "author": author})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "clean.parquet")
    (tmp_path / "meta.json").write_text(json.dumps({"val_fraction": 0.3, "seed": 7}))
    run_script("poetry_bench.py", f"--corpus={tmp_path / 'clean.parquet'}",
               f"--token_meta={tmp_path / 'meta.json'}", f"--out_dir={tmp_path / 'b'}", "--n_val=20", "--n_dev=3")
    held = {r["title"]: r for r in rows if is_val(r["text"], 0.3, 7)}
    assert 60 < len(held) < 180
    exam = load_exam(str(tmp_path / "b"), "val", k_shot=3)
    for subject, part in exam.items():
        assert len(part["questions"]) == 20 and len(part["shots"]) == 3
        for q in part["questions"] + part["shots"]:
            title = q["question"].split("》")[0].lstrip("《")
            poem = held[title]  # every question comes from a held-out document
            right = q["options"][LETTERS.index(q["answer"])]
            if subject == "author":
                assert right == poem["author"] and len(set(q["options"])) == 4
            else:
                shown = q["question"].split("\n")[1:]
                lines = poem["text"].split("\n")[2:]
                assert lines[:len(shown)] == shown and right == lines[len(shown)]
                assert {len(o) for o in q["options"]} == {len(right)} and len(set(q["options"])) == 4
