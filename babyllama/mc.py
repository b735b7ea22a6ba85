"""Multiple-choice exams in the C-Eval and CMMLU layouts: reading the CSV files, building 0-shot and k-shot prompts
(plain text for base models, the chat template for chat models), and the accuracy tables per subject and category that
the C-Eval and CMMLU model cards publish. The scoring is babyllama/scoring.py's. Torch-free.

Layouts (one CSV per subject; column names case-insensitive; files may also sit in <dir> as <subject>_<split>.csv):
  C-Eval  <dir>/<split>/<subject>_<split>.csv   columns id,question,A,B,C,D,answer[,explanation]
  CMMLU   <dir>/<split>/<subject>.csv           columns ,Question,A,B,C,D,Answer (first column: a row index)

Prompt (C-Eval's published format, the answer cue "答案："), for a base model:
    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {shot question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：{letter}\\n\\n      (k times)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案：
For a chat model and for the cloze form (scoring by option text), see encode_pieces."""
import csv
import json
import os

from tokenizer.chat_template import encode_conversation

LETTERS = "ABCD"
CUE = "答案："
SUBJECTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "subjects.json")


class MCError(ValueError):
    """A multiple-choice file or folder that cannot be scored; the message names the file and the row."""


# ---- reading --------------------------------------------------------------------------------------------

def subject_files(folder, split):
    """{subject: path} of the split's CSV files: <folder>/<split>/<subject>[_<split>].csv, or else
    <folder>/<subject>_<split>.csv. MCError naming the folder when there is none."""
    where = os.path.join(folder, split)
    found = {}
    if os.path.isdir(where):
        for name in sorted(os.listdir(where)):
            if name.endswith(".csv"):
                stem = name[:-4]
                found[stem[:-len(split) - 1] if stem.endswith("_" + split) else stem] = os.path.join(where, name)
    elif os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(f"_{split}.csv"):
                found[name[:-len(split) - 5]] = os.path.join(folder, name)
    else:
        raise MCError(f"{folder}: no such folder")
    if not found:
        raise MCError(f"{folder}: no {split} questions (looked for {where}/<subject>.csv, "
                      f"{where}/<subject>_{split}.csv and {folder}/<subject>_{split}.csv)")
    return found


def read_questions(path):
    """The questions of one subject CSV: [{"id", "question", "options": [A, B, C, D], "answer": "A".."D"}]. MCError
    naming the file and row (and first line, for a question spanning lines) for a missing column, an empty question or
    option, an answer not one letter A-D, and a file with no question (an empty subject must not become a 0% row)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows, lines = [], []  # each record and the file line it starts on (a question may span lines)
            start = 1
            for row in reader:
                rows.append(row)
                lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise MCError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise MCError(f"{path}, line {reader.line_num}: not CSV ({e})") from None
    if not rows:
        raise MCError(f"{path}: empty file (want a header id,question,A,B,C,D,answer and one row per question)")
    header = [h.strip().lower() for h in rows[0]]
    cols = {}
    for name in ("question", "a", "b", "c", "d", "answer"):
        if name not in header:
            raise MCError(f"{path}, row 1 (header): missing column {name if len(name) > 1 else name.upper()!r} "
                          f"(header is {','.join(rows[0])})")
        cols[name] = header.index(name)
    id_col = header.index("id") if "id" in header else 0 if header[0] == "" else None
    out = []
    for r, (row, line) in enumerate(zip(rows[1:], lines[1:]), start=2):
        where = f"{path}, row {r}" + (f" (line {line})" if line != r else "")
        if not any(cell.strip() for cell in row):
            continue  # a blank line at the end of a file
        if len(row) < len(header):
            raise MCError(f"{where}: {len(row)} fields, the header has {len(header)}")
        answer = row[cols["answer"]].strip().upper()
        if len(answer) != 1 or answer not in LETTERS:
            raise MCError(f"{where}: answer {row[cols['answer']]!r} is not one of A, B, C, D")
        q = {"id": row[id_col] if id_col is not None else str(r - 2), "question": row[cols["question"]].strip(),
             "options": [row[cols[c]].strip() for c in "abcd"], "answer": answer}
        empty = [n for n, v in zip(("question", "A", "B", "C", "D"), [q["question"]] + q["options"]) if not v]
        if empty:
            raise MCError(f"{where}: empty {', '.join(empty)}")
        out.append(q)
    if not out:
        raise MCError(f"{path}: no questions (a header only)")
    return out


def load_exam(folder, split, shots_split="dev", k_shot=0, subjects=""):
    """{subject: {"questions", "shots", "path"}} for every subject of the split (or the comma-separated `subjects`).
    Shots are the first k_shot questions of the subject in shots_split; a missing or short shots file is an MCError."""
    files = subject_files(folder, split)
    if subjects:
        wanted = [s.strip() for s in subjects.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in files]
        if unknown:
            raise MCError(f"{folder}: no {split} file for subject(s) {', '.join(unknown)}")
        files = {s: files[s] for s in wanted}
    shot_files = subject_files(folder, shots_split) if k_shot > 0 else {}
    exam = {}
    for subject, path in files.items():
        shots = []
        if k_shot > 0:
            if subject not in shot_files:
                raise MCError(f"{folder}: {k_shot}-shot needs {shots_split} questions of {subject!r}; there is no "
                              f"{shots_split} file for it")
            shots = read_questions(shot_files[subject])
            if len(shots) < k_shot:
                raise MCError(f"{shot_files[subject]}: {len(shots)} questions, fewer than k_shot={k_shot}")
        exam[subject] = {"questions": read_questions(path), "shots": shots, "path": path}
    return exam


def load_subjects(benchmark, folder=""):
    """{subject: {"name": Chinese name, "categories": [...], "hard": bool}}: <folder>/subjects.json (as poetry_bench.py
    writes), else for "ceval" or "cmmlu" babyllama/subjects.json's maps; {} otherwise (subjects go by file name)."""
    own = os.path.join(folder, "subjects.json") if folder else ""
    if own and os.path.exists(own):
        with open(own, encoding="utf-8") as f:
            return json.load(f)
    with open(SUBJECTS_FILE, encoding="utf-8") as f:
        return json.load(f).get(benchmark, {})


def guess_benchmark(folder):
    """'ceval' or 'cmmlu' when the folder's name says so, else the folder's own name."""
    name = os.path.basename(os.path.normpath(folder))
    key = name.lower().replace("-", "").replace("_", "")
    return "ceval" if "ceval" in key else "cmmlu" if "cmmlu" in key else name


# ---- prompts --------------------------------------------------------------------------------------------

def instruction(subject_name):
    """The line that opens every prompt (C-Eval's wording)."""
    return f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。"


def question_block(q, cloze=False):
    """The question and its four options, one per line (cloze: the question alone), without the cue."""
    if cloze:
        return q["question"]
    return q["question"] + "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, q["options"]))


def answer_text(q, cloze=False):
    """What follows the cue in a shot: the letter, or (cloze) the text of the right option."""
    return q["options"][LETTERS.index(q["answer"])] if cloze else q["answer"]


def shots_for(q, shots, k):
    """The first k shots that are not the question itself (evaluating on the shots' own split)."""
    return [s for s in shots if s["question"] != q["question"] or s["options"] != q["options"]][:k]


def encode_pieces(tok, subject_name, shots, q, chat, cloze=False):
    """The prompt in token pieces (head, [one per shot], question), ending right after the answer cue. Each piece is
    encoded on its own, so fewer shots are the same pieces with some left out, and head + shots (the prefix) is one KV
    cache for every question of a subject.
      base model: head = eos (every pretraining document follows one) + the instruction; a shot = its question block,
                  the cue and its answer; the question = its block and the cue.
      chat model: head = the instruction as the system prompt; a shot = a user turn (its block) and an assistant turn
                  (cue + answer); the question = a user turn, <|assistant|>, the cue.
    cloze=False lists the options and a shot's answer is its letter (scored by letter); cloze=True shows the question
    alone and a shot's answer is the right option's text (scored by option text; OLMES, Gu et al. 2024, uses both)."""
    if chat:
        head = encode_conversation(tok, [], system=instruction(subject_name))[0]
        shot_ids = [encode_conversation(tok, [{"role": "user", "content": question_block(s, cloze)},
                                              {"role": "assistant", "content": CUE + answer_text(s, cloze)}])[0]
                    for s in shots]
        question = encode_conversation(tok, [{"role": "user", "content": question_block(q, cloze)}])[0]
        return head, shot_ids, question + [tok.assistant_id] + tok.encode(CUE)
    head = [tok.eos_id] + tok.encode(instruction(subject_name) + "\n\n")
    shot_ids = [tok.encode(question_block(s, cloze) + f"\n{CUE}{answer_text(s, cloze)}\n\n") for s in shots]
    return head, shot_ids, tok.encode(question_block(q, cloze) + "\n" + CUE)


def fit_prompt(head, shot_ids, question, max_len):
    """(prefix, suffix, n_shots, truncated) of head + shots + question with as many shots as fit max_len tokens (dropped
    from the last); with none left and still too long, the last max_len tokens (all in suffix)."""
    k = len(shot_ids)
    while k and len(head) + sum(len(x) for x in shot_ids[:k]) + len(question) > max_len:
        k -= 1
    prefix = head + [t for x in shot_ids[:k] for t in x]
    if len(prefix) + len(question) <= max_len:
        return prefix, question, k, False
    return [], (prefix + question)[-max_len:], 0, True


def letter_ids(tok):
    """The token each option letter starts with after the cue. ValueError when two letters share a first token."""
    cue = tok.encode(CUE)
    ids = []
    for L in LETTERS:
        full = tok.encode(CUE + L)
        ids.append(full[len(cue)] if full[:len(cue)] == cue and len(full) > len(cue) else tok.encode(L)[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{tok.model_path}: the letters A-D do not start with distinct tokens ({ids})")
    return ids


# ---- tables ---------------------------------------------------------------------------------------------

def summarize(correct, subjects):
    """Accuracies from {subject: [bool per question]}: per subject, per category (the mean over its subjects, as the
    C-Eval and CMMLU papers average; a CMMLU "China specific" subject counts in its second category too, as CMMLU's code
    does), Average over subjects and, when the map marks hard ones, Average (Hard). Unmapped: "Other"."""
    per_subject = {s: sum(c) / len(c) for s, c in correct.items()}
    by_cat = {}
    for s, acc in per_subject.items():
        for cat in subjects.get(s, {}).get("categories", ["Other"]):
            by_cat.setdefault(cat, []).append(acc)
    out = {"subjects": per_subject, "categories": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
           "average": sum(per_subject.values()) / len(per_subject),
           "questions": sum(len(c) for c in correct.values())}
    hard = [acc for s, acc in per_subject.items() if subjects.get(s, {}).get("hard")]
    if hard:
        out["average_hard"] = sum(hard) / len(hard)
    return out


def category_table(summaries, chance=0.25):
    """Markdown table like the model cards': a row per (label, summary); columns Average, Average (Hard) when any has
    it, then the categories; accuracies in percent."""
    order = ["STEM", "Social Science", "Humanities", "Other", "China specific"]  # the model cards' order
    cats = sorted({c for _, s in summaries for c in s["categories"]},
                  key=lambda c: (order.index(c) if c in order else len(order), c))
    hard = any("average_hard" in s for _, s in summaries)
    head = ["model / scoring", "Average"] + (["Average (Hard)"] if hard else []) + cats + ["questions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for label, s in summaries:
        cells = [label, f"{100 * s['average']:.1f}"]
        if hard:
            cells.append(f"{100 * s['average_hard']:.1f}" if "average_hard" in s else "-")
        cells += [f"{100 * s['categories'][c]:.1f}" if c in s["categories"] else "-" for c in cats]
        lines.append("| " + " | ".join(cells + [str(s["questions"])]) + " |")
    lines.append(f"\n(accuracy in %; chance is {100 * chance:.0f}%)")
    return "\n".join(lines)


def subject_table(summary, subjects):
    """Markdown table of the accuracy per subject (one column per scoring in summary: {scoring: summary})."""
    scorings = list(summary)
    first = summary[scorings[0]]
    lines = ["| subject | category | " + " | ".join(scorings) + " |", "|---|---|" + "---:|" * len(scorings)]
    for s in sorted(first["subjects"]):
        meta = subjects.get(s, {})
        name = f"{s} ({meta['name']})" if meta.get("name") else s
        lines.append(f"| {name} | {', '.join(meta.get('categories', ['Other']))} | " +
                     " | ".join(f"{100 * summary[k]['subjects'][s]:.1f}" for k in scorings) + " |")
    return "\n".join(lines)


def results_tables(summaries, subjects, label, k_shot):
    """The markdown of one run ({scoring: summary}): with categories, the model cards' table (a row per scoring) above
    the table per subject; otherwise the table per subject with an average row."""
    md = subject_table(summaries, subjects)
    if len({c for v in subjects.values() for c in v.get("categories", [])}) > 1:
        return category_table([(f"{label}, {k_shot}-shot, by {sc}", s) for sc, s in summaries.items()]) + "\n\n" + md
    return md + "\n| **average** | | " + " | ".join(f"**{100 * s['average']:.1f}**" for s in summaries.values()) + \
        " |\n\n(accuracy in %; chance is 25%)"


def flagged_keys(path):
    """{subject/id} of the items a result file of contamination.py flagged."""
    try:
        with open(path, encoding="utf-8") as f:
            return {r["key"] for r in json.load(f)["flagged_items"]}
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a result of contamination.py ({type(e).__name__}: {e})") from None
