"""Atomic output files: written under a temporary name beside the target and renamed over it only once complete; on any
error the temporary file is removed and the target left as it was. A reader sees the old file or the new one.

    with atomic_path("out/clean.parquet") as tmp:     # write tmp however you like (pyarrow wants a path)
        pq.write_table(table, tmp)
    with atomic_open("out/report.txt") as f:          # or get an open text file
        f.write("...")

Files that belong together go on one contextlib.ExitStack: an error anywhere replaces no target. Torch-free."""
from contextlib import contextmanager, suppress
import glob
import json
import os


def temp_path(path):
    """The temporary name `path` is written under: beside it (one filesystem, so os.replace is atomic), with this
    process' id so two writers of one target never share it."""
    return f"{path}.tmp.{os.getpid()}"


def remove_stale_temps(path):
    """Remove path's temporary files (path.tmp.<pid>) whose writer process is gone; a live writer's stays."""
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
    """Yields the temporary path (temp_path) to write under; renamed over `path` when the block ends without an error,
    else removed. Creates the folder, and first removes the temporary files of killed earlier writers."""
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
    """atomic_path with the temporary file opened (text mode is UTF-8), closed before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


def write_json(path, obj, indent=1):
    """obj as UTF-8 JSON (non-ASCII kept as is, a final newline), atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def write_jsonl(path, rows):
    """One JSON value per line (UTF-8, non-ASCII kept as is), atomically."""
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
