"""Overrides for the plain globals at the top of a script, as in nanoGPT:

    python pretrain.py config/demo_cpu.py --batch_size=16 --compile=False

A bare argument is a config file of Python assignments executed into the script's globals. `--key=value` sets one
global, parsed as a Python literal when it can be; it must have the type of the default it replaces (a float default
takes an int, 'auto' a bool, None anything; a string default keeps digits or a comma list as the text given, as in
--ratios=1,0.5), so a typo fails loudly. Torch-free (data scripts use it)."""
import ast
import inspect
import json
import os
import re
import sys
import time


def _parse_value(key, text, old):
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        value = text  # a bare string such as --device=cuda
    if old is None:
        return value
    if old == "auto" and isinstance(value, bool):
        return value  # a setting that is True, False or 'auto' (compile)
    if isinstance(old, str) and old != "auto" and type(value) in (int, float, tuple):  # (not bool: a subclass)
        return text  # a string setting given digits or a list: --ratios=1,0.5 is the text "1,0.5"
    if value is None:
        raise ValueError(f"--{key}={text}: expected {type(old).__name__}, got None")
    if isinstance(old, bool) != isinstance(value, bool):
        raise ValueError(f"--{key}={text}: expected {type(old).__name__}, got {type(value).__name__}")
    if isinstance(old, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(old)):
        raise ValueError(f"--{key}={text}: expected {type(old).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(g, argv=None, verbose=True):
    """Apply argv's config files and --key=value overrides (default sys.argv[1:]) to dict g; returns changed keys."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(g))
        sys.exit(0)
    changed = []
    for arg in argv:
        if not arg.startswith("--"):
            with open(arg, encoding="utf-8") as f:
                source = f.read()
            if verbose:
                print(f"config file {arg}")
            before = {k: v for k, v in g.items() if not k.startswith("_")}
            exec(compile(source, arg, "exec"), g)
            changed += [k for k in g if not k.startswith("_") and (k not in before or before[k] is not g[k])]
            continue
        if "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in g:
            raise ValueError(f"unknown config key {key!r} (from {arg!r})")
        g[key] = _parse_value(key, text, g[key])
        if verbose:
            print(f"override {key} = {g[key]!r}")
        changed.append(key)
    return changed


def usage(g):
    """--help: the script's docstring, then every hyperparameter with its default and its comment in the source."""
    try:
        source = inspect.getsource(sys.modules[g["__name__"]]) if g.get("__name__") in sys.modules else ""
    except (OSError, TypeError):
        source = ""
    comments = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+) = [^#\n]*#\s*(.*)$", source, re.M)}
    lines = [(g.get("__doc__") or "").strip(), "", "settings (--key=value, or a config file of assignments):"]
    width = max((len(k) for k in config_of(g)), default=0)
    for k, v in config_of(g).items():
        lines.append(f"  --{k.ljust(width)} = {v!r}" + (f"    # {comments[k]}" if k in comments else ""))
    return "\n".join(lines)


def config_of(g):
    """The script's hyperparameters: its public globals of simple types (what a checkpoint stores)."""
    simple = (int, float, bool, str, type(None))
    return {k: v for k, v in g.items()  # ALL_CAPS names are the script's constants, not settings
            if not k.startswith("_") and not k.isupper() and (isinstance(v, simple) or
                                          (isinstance(v, (list, tuple)) and all(isinstance(x, simple) for x in v)))}


def configure(g):
    """A script's configuration step on its globals g: its hyperparameter names (config_of, taken first), then the
    command line applied when run as __main__ (not when a test imports it). Returns (config_keys, changed keys)."""
    config_keys = list(config_of(g))
    try:  # under torchrun only rank 0 echoes the config files and overrides
        verbose = int(os.environ.get("RANK", "0")) == 0
        changed = apply_overrides(g, verbose=verbose) if g.get("__name__") == "__main__" else []
    except (ValueError, OSError) as e:  # a typo'd key, a wrong type, a missing config file: one line, no traceback
        exit_error(f"error: {e}")
    return config_keys, changed


def exit_error(message):
    """End with exit status 1 and message on stderr, said once: under torchrun rank 0 prints it (and writes torchrun's
    error file, which its failure report shows as the root cause); the other ranks wait a moment and leave silently, so
    rank 0 fails first rather than being stopped by torchrun before it could print."""
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(5)
        raise SystemExit(1)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w", encoding="utf-8") as f:  # torchrun's layout
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                      "timestamp": str(int(time.time()))}}}, f)
    raise SystemExit(message)


def run_main(g, main):
    """A data script's entry point: the command line applied to its globals g, then main(). OSError or ValueError (whose
    messages name the file) ends with a one-line `error: ...` and exit status 1, not a traceback."""
    try:
        apply_overrides(g)
        main()
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
