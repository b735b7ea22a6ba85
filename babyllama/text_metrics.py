"""BLEU-1..4 and ROUGE-L of generated answers against references, through sacrebleu (Post 2018) for BLEU (Papineni et
al. 2002) and rouge-score (Lin 2004's ROUGE-L, the LCS F-measure). Our code is the glue: one tokenisation for both,
sacrebleu's "zh" (every CJK character a token, the standard for Chinese BLEU) or "13a" words for text without Chinese.
Torch-free.

BLEU-n: geometric mean of the modified 1..n-gram precisions times the brevity penalty, in percent; corpus level with
counts summed over samples, no smoothing (0 when some order has no match); per sample sacrebleu's sentence BLEU
(effective order, "exp" smoothing), as a reading aid. ROUGE-L: F1 of LCS precision and recall per sample, in percent;
the corpus figure is the mean over samples. chrF (Popović 2015, sacrebleu's CHRF: character 6-grams, beta 2), corpus
level, in percent: the standard second figure for translation, kinder than BLEU to a partly right character string."""
import re

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def language_of(references):
    """'zh' when any reference has a CJK character, else 'en' (any language written with spaces)."""
    return "zh" if any(CJK.search(r) for r in references) else "en"


class _Tokens:
    """rouge-score's tokenizer interface over sacrebleu's tokenisation, so both metrics count the same tokens."""

    def __init__(self, lang):
        self.tok = TokenizerZh() if lang == "zh" else Tokenizer13a()

    def tokenize(self, text):
        return self.tok(text).split()


def _rouge_l(lang):
    from rouge_score import rouge_scorer  # imported here: it pulls in nltk and scipy (a second) for gen mode alone
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokens(lang))


def tokens(text, lang):
    """The tokens both metrics count for text: characters for Chinese, words otherwise."""
    return _Tokens(lang).tokenize(text)


def corpus_scores(hypotheses, references, lang=None):
    """{"bleu1".."bleu4", "rougeL", "chrf", "n", "lang"} over parallel lists of strings (one reference each). lang:
    'zh' or 'en'; None = language_of(references). ValueError for lists of different lengths or empty ones."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    lang = lang or language_of(references)
    sb_tok = "zh" if lang == "zh" else "13a"
    out = {"n": len(references), "lang": lang}
    for n in range(1, 5):
        bleu = BLEU(tokenize=sb_tok, max_ngram_order=n, smooth_method="none")
        out[f"bleu{n}"] = bleu.corpus_score(list(hypotheses), [list(references)]).score
    out["chrf"] = CHRF().corpus_score(list(hypotheses), [list(references)]).score
    scorer = _rouge_l(lang)
    out["rougeL"] = 100 * sum(scorer.score(r, h)["rougeL"].fmeasure
                              for h, r in zip(hypotheses, references)) / len(references)
    return out


def sample_scores(hypothesis, reference, lang):
    """{"bleu1".."bleu4", "rougeL"} of one sample, in percent (sentence BLEU: effective order, exp smoothing)."""
    sb_tok = "zh" if lang == "zh" else "13a"
    out = {}
    for n in range(1, 5):
        bleu = BLEU(tokenize=sb_tok, max_ngram_order=n, effective_order=True)
        out[f"bleu{n}"] = bleu.sentence_score(hypothesis, [reference]).score
    out["rougeL"] = 100 * _rouge_l(lang).score(reference, hypothesis)["rougeL"].fmeasure
    return out


def scores_table(rows):
    """Markdown table: one row per (label, corpus_scores dict)."""
    lines = ["| model | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | chrF | samples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in rows:
        lines.append(f"| {label} | " + " | ".join(f"{s[k]:.2f}" if k in s else "-" for k in
                                                  ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "chrf"))
                     + f" | {s['n']} |")
    return "\n".join(lines)
