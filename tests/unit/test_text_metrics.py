"""babyllama/text_metrics.py, BLEU and ROUGE-L against hand-computed values: identical strings score 100, no overlap
0, the brevity penalty, n-gram precisions and the longest common subsequence by hand, English by words."""
import math

import pytest

from babyllama import text_metrics


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



def test_chrf_is_100_for_identical_text_and_0_without_a_shared_character():
    assert text_metrics.corpus_scores(["学习并且时常温习它"], ["学习并且时常温习它"])["chrf"] == pytest.approx(100)
    assert text_metrics.corpus_scores(["春眠不觉晓"], ["黄河入海流"])["chrf"] == 0


def test_copy_baseline_scored_by_hand_beside_the_model_answers():
    from babyllama.answering import answer_scores
    # copying the classical text 学而时习之 against the translation 学习并且时常温习它 (characters are the tokens):
    # unigrams 学 时 习 match (3 of 5), no bigram does; brevity penalty exp(1 - 9/5); LCS 学 时 习 = 3
    items = [{"question": "把下面的文言文翻译成现代文：\n学而时习之", "reference": "学习并且时常温习它", "kind": "pairs",
              "answer": "学习并且时常温习它", "finished": True, "baselines": {"copy": "学而时习之"}},
             {"question": "头晕？", "reference": "多休息", "kind": "qa", "answer": "多休息", "finished": True}]
    s = answer_scores(items)
    copy = s["pairs"]["baselines"]["copy"]
    assert copy["bleu1"] == pytest.approx(100 * math.exp(1 - 9 / 5) * 3 / 5) and copy["bleu2"] == 0
    p, r = 3 / 5, 3 / 9
    assert copy["rougeL"] == pytest.approx(100 * 2 * p * r / (p + r))
    assert s["pairs"]["bleu4"] == pytest.approx(100) and s["pairs"]["chrf"] == pytest.approx(100)
    assert "baselines" not in s["qa"]  # a kind without baselines has none


def test_chat_scores_are_given_again_without_the_contaminated_questions():
    from babyllama.answering import answer_scores
    items = [{"question": "q1", "reference": "多休息", "answer": "多休息", "finished": True, "kind": "qa",
              "contaminated": True, "baselines": {"nearest": "多休息"}},
             {"question": "q2", "reference": "测血压", "answer": "多喝水", "finished": True, "kind": "qa",
              "contaminated": False, "baselines": {"nearest": "测血压"}}]
    s = answer_scores(items)["qa"]
    assert s["n"] == 2 and s["uncontaminated"]["n"] == 1
    assert s["uncontaminated"]["rougeL"] == 0 and s["uncontaminated"]["baselines"]["nearest"]["rougeL"] == 100
    assert "uncontaminated" not in answer_scores([items[1]])["qa"]  # nothing flagged: no second set
