"""babyllama/readers.py (and poetry_corpus.py): documents from every file type, the chinese-poetry layouts and
package (its non-document files skipped by rule and counted), .txt paragraphs, and bad records skipped and named
file:line (a malformed spot in a .json array stops that file, keeping what came before; a line not UTF-8)."""
import json

from conftest import POETRY_RECORDS, POETRY_TEXTS

from babyllama.poetry_corpus import poetry_document_files
from babyllama.readers import iter_documents, record_to_documents
from babyllama.records import ReadErrors


def test_poetry_layout_reader(tmp_path):
    poems = tmp_path / "poems.json"
    poems.write_text(json.dumps(POETRY_RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    errors = ReadErrors()
    docs = list(iter_documents(str(poems), errors=errors))
    assert [d["text"] for d in docs] == POETRY_TEXTS
    assert docs[0]["title"] == "静夜思" and docs[0]["author"] == "李白"
    assert errors.by_reason == {"empty paragraphs": 1}
    # variants found in the chinese-poetry package
    assert record_to_documents({"title": "长相思", "para": ["山一程，水一程"], "author": "纳兰性德"})[0][0]["text"] \
        == "长相思\n纳兰性德\n山一程，水一程"
    assert record_to_documents({"title": "关雎", "chapter": "国风", "content": ["关关雎鸠，在河之洲。"]})[0][0]["text"] \
        == "关雎\n关关雎鸠，在河之洲。"
    book = {"title": "千家詩", "author": "谢枋得", "content": [{"type": "五言絕句", "content": [
        {"chapter": "春眠", "author": "孟浩然", "paragraphs": ["春眠不覺曉，處處聞啼鳥。"]},
        {"chapter": "雪梅", "author": "盧梅坡", "paragraphs": [
            {"subchapter": "其一", "paragraphs": ["梅雪爭春未肯降，"]},
            {"subchapter": "其二", "paragraphs": ["有梅無雪不精神，"]}]}]}]}
    docs, problems = record_to_documents(book)
    assert problems == []
    assert [d["text"] for d in docs] == ["春眠\n孟浩然\n春眠不覺曉，處處聞啼鳥。",
                                         "雪梅\n盧梅坡\n其一\n梅雪爭春未肯降，\n其二\n有梅無雪不精神，"]
    assert docs[0]["collection"] == "千家詩"
    # a chinese-poetry package: non-document files are skipped by rule and counted, sources are relative
    pkg = tmp_path / "folder" / "chinese-poetry"
    (pkg / "dist" / "quantangshi" / "error").mkdir(parents=True)
    (pkg / "dist" / "strains" / "json").mkdir(parents=True)
    (pkg / "package.json").write_text('{"name": "chinese-poetry", "version": "2.0.1"}')
    poem = [{"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。"], "id": "x"}]
    for rel in ("dist/quantangshi/poet.tang.0.json", "dist/quantangshi/error/poet.tang.0.json"):
        (pkg / rel).write_text(json.dumps(poem, ensure_ascii=False), encoding="utf-8")
    (pkg / "dist/quantangshi/authors.tang.json").write_text('[{"name": "李白", "desc": "..."}]', encoding="utf-8")
    (pkg / "dist/strains/json/poet.tang.0.json").write_text('[{"strains": ["平平"], "id": "x"}]')
    errors = ReadErrors()
    docs = list(iter_documents(str(pkg), errors=errors))
    assert [d["source"] for d in docs] == ["dist/quantangshi/poet.tang.0.json"]
    assert errors.count == 0 and errors.skipped_file_count == 3 and errors.files_read == 1
    docs = list(iter_documents(str(pkg.parent), errors=ReadErrors()))  # a folder holding the package: same rules
    assert [d["source"] for d in docs] == ["chinese-poetry/dist/quantangshi/poet.tang.0.json"]
    files, skipped = poetry_document_files(str(pkg), include_error=True)
    assert len(files) == 2 and len(skipped) == 2


def test_a_malformed_spot_in_a_json_array_stops_that_file_keeping_what_came_before(tmp_path):
    (tmp_path / "x.json").write_text('[\n {"text": "first document ok"},\n {"text": oops},\n {"text": "never read"}\n]')
    errors = ReadErrors()
    docs = [d["text"] for d in iter_documents(str(tmp_path), errors=errors)]
    assert docs == ["first document ok"]
    assert errors.count == 1 and errors.examples[0].startswith("x.json:3: bad json")
    assert "x.json:3" in errors.report()


def test_txt_paragraphs_and_a_line_not_utf8_skipped_and_named(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("para one\nstill one\n\n\npara two\n", encoding="utf-8")
    docs = list(iter_documents(str(p), txt_mode="paragraph"))
    assert [(d["text"], d["line"]) for d in docs] == [("para one\nstill one", 1), ("para two", 5)]
    q = tmp_path / "bad.jsonl"
    q.write_bytes(b'{"text": "good one"}\n{"text": "\xff\xfe"}\n{"text": "good two"}\n')
    errors = ReadErrors()
    assert [d["text"] for d in iter_documents(str(q), errors=errors)] == ["good one", "good two"]
    assert errors.examples[0].startswith(f"{q}:2: invalid utf-8")  # a file given by name: its path as given
