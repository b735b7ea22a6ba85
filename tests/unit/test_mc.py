"""babyllama/mc.py, C-Eval / CMMLU exams: k-shot prompts hold k dev examples of the subject and never the question,
long prompts drop shots before they are cut from the left, category averages are means over subjects, and a bad
exam file is named with its row."""
from conftest import QUESTIONS, write_csv, write_exam
import pytest

from babyllama.mc import MCError, encode_pieces, fit_prompt, load_exam, read_questions, shots_for, summarize


def test_k_shot_prompts_hold_k_dev_examples_of_the_subject_and_never_the_question(tiny_tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path, n_dev=4)), "val", k_shot=3)
    for chat in (False, True):
        head, shots, question = encode_pieces(tiny_tok, "诗", exam["poems"]["shots"][:3], exam["poems"]["questions"][0],
                                              chat)
        prefix, suffix, k, cut = fit_prompt(head, shots, question, 1000)
        text = tiny_tok.decode(prefix + suffix)
        assert (k, cut) == (3, False)
        assert [text.count(f"poems样例{i}号") for i in range(4)] == [1, 1, 1, 0]
        assert "authors样例" not in text and text.count(QUESTIONS[0][0]) == 1
    # scoring the dev split itself with its own shots: a question is never its own example
    dev = load_exam(str(tmp_path), "dev", "dev", k_shot=3)
    q = dev["poems"]["questions"][1]
    chosen = shots_for(q, dev["poems"]["shots"], 3)
    assert len(chosen) == 3 and q not in chosen


def test_long_prompts_drop_shots_before_truncating_from_the_left(tiny_tok, tmp_path):
    exam = load_exam(str(write_exam(tmp_path, n_dev=3)), "val", k_shot=3)
    q = exam["poems"]["questions"][0]
    head, shots, question = encode_pieces(tiny_tok, "诗", exam["poems"]["shots"], q, False)
    full = len(head) + sum(map(len, shots)) + len(question)
    prefix, suffix, k, cut = fit_prompt(head, shots, question, full - 1)  # one token short: the last shot goes
    assert (k, cut) == (2, False) and prefix == head + shots[0] + shots[1] and suffix == question
    prefix, suffix, k, cut = fit_prompt(head, shots, question, len(head) + len(question))  # exactly 0-shot
    assert (k, cut) == (0, False)
    prefix, suffix, k, cut = fit_prompt(head, shots, question, len(question) - 2)  # even 0-shot is too long
    assert (k, cut) == (0, True) and prefix == [] and suffix == question[2:]


def test_category_averages_are_means_over_their_subjects():
    subjects = {"a": {"categories": ["STEM"], "hard": True}, "b": {"categories": ["STEM"]},
                "c": {"categories": ["Humanities", "China specific"]}}
    s = summarize({"a": [True, False], "b": [True, True, True, False], "c": [False, False, False, True, True]},
                  subjects)
    assert s["subjects"] == {"a": 0.5, "b": 0.75, "c": 0.4}
    assert s["categories"] == pytest.approx({"STEM": 0.625, "Humanities": 0.4, "China specific": 0.4})
    assert s["average"] == pytest.approx((0.5 + 0.75 + 0.4) / 3)  # over subjects, not the 11 questions
    assert s["average_hard"] == 0.5 and s["questions"] == 11


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

