"""python tests/two_processes.py script.py [args]: script on 2 processes with the environment torchrun gives them (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), without torchrun's own interpreter and agent
(2.5 s a launch). When one process fails the other is killed, as torchrun does, so a collective never waits forever;
when the launcher itself is killed (a test's timeout), the kernel kills both (PR_SET_PDEATHSIG).
Exits with the first non-zero exit code, else 0. The tests use it for every 2-process run but one, which keeps the
real torchrun (tests/scripts/test_pretrain.py's DDP test)."""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time


def free_port():  # babyllama.dist has one too, but importing it imports torch: 1.5 s a launch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


def main(argv, n=2):
    env = dict(os.environ, WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              preexec_fn=die_with_parent) for r in range(n)]
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return failed[0] if failed else 0
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
