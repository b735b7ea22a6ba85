"""Files of tensors (torch.save) that say what is wrong with them: a CRC-32 of every tensor is saved in the file and
checked on loading; an empty, truncated or corrupted file, and a disk that fills up during a save, are named."""
from contextlib import contextmanager
import errno
import os
import shutil
import zipfile
import zlib

import torch

from babyllama.atomic import atomic_path


class CheckpointError(ValueError):
    """A file torch.load cannot read, or whose tensors differ from their saved checksum; says the file and why."""


def tensors(obj, key=""):
    """(key, tensor) of every tensor in nested dicts, lists, tuples; key like 'model/layers.0.attention.wq.weight'."""
    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from tensors(v, f"{key}/{k}" if key else str(k))


def checksums(state):
    """{key: CRC-32 of the tensor's dtype, shape and bytes} for every tensor in state (see tensors).
    ~16 ms per 100 MB on one CPU core; CUDA tensors are copied to the CPU first."""
    out = {}
    for key, t in tensors(state):
        flat = t.detach().reshape(-1).contiguous().cpu()
        out[key] = zlib.crc32(flat.view(torch.uint8).numpy(), zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode()))
    return out


@contextmanager
def space_named(path):
    """Re-raise a full disk (or quota) while writing path as an OSError saying "no space left on <folder>"."""
    try:
        yield
    except Exception as e:
        full = e
        while full is not None and not (isinstance(full, OSError) and full.errno in (errno.ENOSPC, errno.EDQUOT)):
            full = full.__cause__ or full.__context__  # torch.save's zip writer raises a RuntimeError over it
        if full is None:
            raise
        folder = os.path.dirname(os.path.abspath(path))
        kept = "keeps its previous contents" if os.path.exists(path) else "was not written"
        raise OSError(full.errno, f"no space left on {folder} ({shutil.disk_usage(folder).free:,} bytes free): "
                                  f"{path} {kept}") from e


def save(path, state):
    """torch.save(state) atomically, with "checksum": checksums(state). Written through a Python file so a full disk
    is an OSError (ENOSPC) naming the folder, and path keeps its previous contents."""
    with space_named(path), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({**state, "checksum": checksums(state)}, f)


def copy(src, dst):
    """Copy a file atomically (best.pt from ckpt.pt); a full disk is named as in save."""
    with space_named(dst), atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def load(path, device="cpu"):
    """The dict save wrote, tensors on device, its checksum verified and removed (a file without one, written before
    checksums, loads unchecked). Raises CheckpointError naming the file and what is wrong: empty, truncated,
    corrupted (a record failing the zip's CRC-32, a tensor its checksum), or not a torch.save file at all.
    weights_only: a checkpoint is data, never code."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # EOFError, a zip, unpickling or seek error: say which file and what is wrong with it
        why = damage(path)
        if not why and isinstance(e, OSError):  # permissions, an I/O error: the reading failed, not the file
            raise
        said = str(e).partition("\n")[0][:200]
        raise CheckpointError(f"{path}: {why or f'cannot be read as a checkpoint ({type(e).__name__}: {said})'}") from e
    saved = state.pop("checksum", None) if isinstance(state, dict) else None
    if saved is not None:
        now = checksums(state)
        bad = [k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)]
        if bad:
            raise CheckpointError(f"{path}: corrupted: {len(bad)} tensor(s) differ from the checksum saved with them "
                                  f"({', '.join(sorted(bad)[:3])}): a flipped bit on disk or in a copy")
    return state


def file_crc(path, chunk=1 << 24):
    """The CRC-32 of a file's bytes, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def damage(path):
    """What is wrong with a file torch.load refused, in words ("" when the zip torch.save writes looks whole)."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty (0 bytes): a save or copy that wrote nothing"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return f"not a checkpoint ({size:,} bytes, not the zip file torch.save writes)"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # the first record whose bytes fail their CRC-32
    except zipfile.BadZipFile:
        return f"truncated: {size:,} bytes, ending before the zip's directory (a save or copy cut short)"
    return f"corrupted: record {bad} fails its CRC-32 (a flipped bit on disk or in a copy)" if bad else ""
