"""A fork server for the tests' script runs: one process per pytest worker that has imported torch and torch._dynamo
(which every optimizer imports: 1.7 s) and nothing of the project, and has run no torch operation (no thread pool to
lose in a fork). Each run forks it: the child sets argv, the working directory, the environment and sys.path as
`python script.py` / `python -m module` would, sends stdout and stderr to files, runs the script as __main__ and exits
with its code. A run then costs its own work, not 3.5 s of imports: the suite took 154 and 183 s instead of 314-341 s on
the 2-core box (CPU time 220-248 s instead of 590).

What a fresh interpreter would differ in: third-party modules are already imported (an `import` statement still
binds each name, so a missing one fails as before); what is read at interpreter start-up is not re-read, so a run
with an env of its own (PYTHONPATH's sitecustomize: the fault injector) gets a real interpreter from
conftest.run_script; and every forked run has the server's str hash seed (a real run draws its own), so the tests
cannot catch set-order nondeterminism, which no script depends on (the demo is checked bit for bit in fresh
interpreters).

Protocol (stdin / stdout, one JSON line each): {"argv", "cwd", "env", "stdout", "stderr", "stdin"} -> {"pid"} when the
child starts, then {"returncode"} (negative: the signal that killed it)."""
import atexit
import contextlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

_SERVER = []  # the client side (a pytest worker): its server process, started on first use


def fork_server(env):
    """This worker's server process (started on first use, with its first run's environment; it ends when the worker
    exits and closes its stdin). Its replies are read unbuffered, so select() sees every one."""
    if not _SERVER or _SERVER[0].poll() is not None:
        _SERVER[:] = [subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, bufsize=0)]
    return _SERVER[0]


def _reply(server, timeout=None):
    """The server's next JSON line, or None after timeout seconds. RuntimeError if the server has died."""
    line, deadline = b"", None if timeout is None else time.monotonic() + timeout
    while not line.endswith(b"\n"):
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([server.stdout], [], [], wait)[0]:
            return None
        chunk = os.read(server.stdout.fileno(), 1)
        if not chunk:
            raise RuntimeError(f"the fork server exited ({server.wait()})")
        line += chunk
    return json.loads(line)


def run_forked(argv, env, cwd, input=None, timeout=300):
    """`python *argv` as a fork of the fork server: a CompletedProcess; subprocess.TimeoutExpired (the run killed)
    after timeout seconds."""
    server = fork_server(env)
    with tempfile.TemporaryDirectory() as d:
        files = {k: os.path.join(d, k) for k in ("stdin", "stdout", "stderr")}
        for k, path in files.items():
            with open(path, "w", encoding="utf-8") as f:
                f.write((input or "") if k == "stdin" else "")
        server.stdin.write((json.dumps(dict(argv=argv, cwd=cwd, env=env, **files)) + "\n").encode())
        server.stdin.flush()
        pid = _reply(server)["pid"]
        done = _reply(server, timeout)
        timed_out = done is None
        if timed_out:  # still running: the server has not reaped it, so the pid is still that run's
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            done = _reply(server)
        out, err = (open(files[k], encoding="utf-8").read() for k in ("stdout", "stderr"))
    if timed_out:
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out, err)
    return subprocess.CompletedProcess([sys.executable, *argv], done["returncode"], out, err)


# ---- the server ------------------------------------------------------------------------------------------------

def child(req):
    """In the forked child: become `python <argv>` and never return."""
    # a fresh interpreter's handlers: SIGINT raises KeyboardInterrupt, SIGPIPE is ignored (BrokenPipeError), SIGTERM kills
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, mode in ((0, req["stdin"], os.O_RDONLY), (1, req["stdout"], os.O_WRONLY),
                           (2, req["stderr"], os.O_WRONLY)):
        os.dup2(os.open(path, mode), fd)
    argv = req["argv"]
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:1] = [os.getcwd(), *extra]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[:1] = [os.path.dirname(os.path.abspath(argv[0])), *extra]
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"): printed to stderr, exit status 1
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT  # reported as Python reports it: killed by SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    try:  # what an interpreter does on exit: join the non-daemon threads, run the atexit functions, flush
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code)


def main():
    import importlib
    importlib.import_module("torch")  # what every script imports first; no torch operation is run here
    importlib.import_module("torch._dynamo")  # what torch.optim imports on first use
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
