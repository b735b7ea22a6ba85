"""
Atomic output files (checkpoints, logs, data, reports): a file is written under a temporary name beside its target and renamed
over the target only once it is complete; on any error the temporary file is removed and the target is left
byte-identical. A reader (or the next pipeline step) sees the old file or the new one, never half of one.

    with atomic_path("out/clean.parquet") as tmp:     # write tmp however you like (pyarrow wants a path)
        pq.write_table(table, tmp)
    with atomic_open("out/report.txt") as f:          # or get an open text file
        f.write("...")
    write_json("out/stats.json", stats)
    write_jsonl("out/train.jsonl", rows)

Several files that belong together (clean.parquet, removed.jsonl, report.json) are entered on one
contextlib.ExitStack: an error anywhere in the block removes every temporary file and replaces no target.
Torch-free.
"""
from contextlib import contextmanager, suppress
import glob
import json
import os


def temp_path(path):
    """The temporary name `path` is written under: beside it (one filesystem, so os.replace is atomic), with this
    process' id so two runs writing the same target never share a temporary file."""
    return f"{path}.tmp.{os.getpid()}"


def remove_stale_temps(path):
    """Remove the temporary files (path.tmp.<pid>) that writers killed mid-write left behind: those whose process
    is gone. A live writer's temporary file (another process writing now) is left alone."""
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = tmp.rsplit(".", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            with suppress(FileNotFoundError):
                os.remove(tmp)


def pid_alive(pid):
    """True when a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    return True


@contextmanager
def atomic_path(path):
    """Yields the temporary path (temp_path) to write the file under. When the with-block ends without an error
    the file is renamed over `path`; on an error it is removed and `path` is left as it was. The folder is
    created if needed, and temporary files of earlier writers of `path` that were killed are removed first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the block failed (or wrote nothing to rename): leave nothing behind
            os.remove(tmp)


@contextmanager
def atomic_open(path, mode="w"):
    """atomic_path with the temporary file opened: yields a file object (text mode is UTF-8); the file is
    closed before it is renamed."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


def write_json(path, obj, indent=1):
    """obj as UTF-8 JSON (non-ASCII characters kept as they are, a final newline), atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_jsonl(path, rows):
    """One JSON value per line (UTF-8, non-ASCII characters kept as they are), atomically."""
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
