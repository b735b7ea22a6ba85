"""python -m clean_data as users run it: command-line overrides reach the pipeline; a missing input, or one without
documents, exits non-zero writing nothing; a typo in the input leaves existing outputs byte-identical, and an error
in the middle of a run leaves no temporary file."""
import json

from conftest import run_script, snapshot, write_documents
import pytest

from clean_data.clean import clean


def test_command_line_overrides_reach_the_pipeline(tmp_path):
    inp = write_documents(tmp_path, 3)  # three documents of 64 characters
    with open(inp, "a", encoding="utf-8") as f:  # and one of 15: it passes the default min_chars 10
        f.write(json.dumps({"text": "床前明月光，疑是地上霜。举头望"}, ensure_ascii=False) + "\n")
    run_script("-m", "clean_data", f"--input={inp}", f"--out_dir={tmp_path / 'out'}",
               "--num_workers=1", "--min_chars=20", "--stages=filter,exact", timeout=60)
    r = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert r["config"]["min_chars"] == 20 and r["config"]["num_workers"] == 1
    assert r["stages"]["filter"]["removed_by"] == {"too_short": 1} and r["documents_out"] == 3
    assert list(r["stages"]) == ["filter", "exact"]


@pytest.mark.parametrize("kind", ["missing path", "empty file", "empty folder"])
def test_clean_data_missing_or_documentless_input_exits_nonzero_writing_nothing(tmp_path, kind):
    inp = {"missing path": tmp_path / "nope.jsonl", "empty file": tmp_path / "empty.jsonl",
           "empty folder": tmp_path / "folder"}[kind]
    if kind == "empty file":
        inp.write_text("\n", encoding="utf-8")
    if kind == "empty folder":
        inp.mkdir()
    out = tmp_path / "out"
    p = run_script("-m", "clean_data", f"--input={inp}", f"--out_dir={out}", "--num_workers=1", check=False,
                   timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and str(inp) in p.stderr
    assert not out.exists()


def test_clean_data_typo_input_leaves_existing_outputs_byte_identical(tmp_path):
    good = write_documents(tmp_path / "in")
    out = tmp_path / "out"
    report = clean(str(good), str(out), num_workers=1, progress=False)
    assert report["documents_out"] == 6
    before = snapshot(out)
    assert sorted(before) == ["clean.parquet", "removed.jsonl", "report.json"]
    p = run_script("-m", "clean_data", f"--input={tmp_path / 'in' / 'in.jsnol'}", f"--out_dir={out}",
                   "--num_workers=1", check=False, timeout=60)
    assert p.returncode == 1 and "in.jsnol" in p.stderr
    assert snapshot(out) == before  # byte-identical, and no *.tmp file
    # an error in the middle of the run (a corrupt file after a good one): the temporary files go, nothing else
    (tmp_path / "in" / "z.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="z.parquet: not a readable parquet file"):
        clean(str(tmp_path / "in"), str(out), num_workers=1, progress=False)
    assert snapshot(out) == before
