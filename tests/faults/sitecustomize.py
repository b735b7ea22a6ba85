"""Fault injection for tests/scripts/test_pretrain.py's killed-runs test, loaded only by the subprocesses of the
tests that put this folder on PYTHONPATH. With KILL_AT_SAVE=N the process's N-th torch.save writes the first bytes
of its file and then kills the process with SIGKILL, as a power cut in the middle of writing a checkpoint would."""
import os
import signal

if int(os.environ.get("KILL_AT_SAVE", "0")):
    import torch

    _save, _calls = torch.save, [0]

    def _save_then_die(obj, f, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["KILL_AT_SAVE"]):
            half = f if hasattr(f, "write") else open(f, "wb")  # checkpoints are saved into an open file
            half.write(b"PK\x03\x04" + b"\0" * 4096)
            half.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(obj, f, *args, **kwargs)

    torch.save = _save_then_die
