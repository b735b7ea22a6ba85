"""The read-set of a script: its lines plus the lines of every project module it imports, transitively (any import
statement anywhere in a file counts, a package's __init__.py too). What a student must read to understand it.

    python tests/read_set.py                      # every runnable script at the root, and model.py's length
    python tests/read_set.py pretrain.py eval.py  # these, with the files behind each number
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_file(name, root=ROOT):
    """The project file of a dotted module name (a module or a package's __init__.py), or None (not ours)."""
    path = os.path.join(root, *name.split("."))
    for f in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.isfile(f):
            return f
    return None


def imported_names(path, root=ROOT):
    """Every module name an import statement in the file at path may load: for `from a.b import c` that is a,
    a.b and a.b.c (c may be a module); relative imports resolved against the file's package."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = os.path.relpath(os.path.dirname(path), root).split(os.sep)
                package = package[:len(package) - node.level + 1]
                base = ".".join(p for p in package + [base] if p and p != ".")
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    # a package's __init__ runs before any of its modules
    return {".".join(n.split(".")[:k]) for n in names for k in range(1, len(n.split(".")) + 1)}


def project_imports(path, root=ROOT):
    """The project files the file at path imports directly."""
    files = {module_file(n, root) for n in imported_names(path, root)}
    return {f for f in files if f and os.path.abspath(f) != os.path.abspath(path)}


def read_set(script, root=ROOT):
    """The files a reader of script must read: the script and every project file it imports, transitively."""
    seen, todo = set(), [os.path.join(root, script)]
    while todo:
        f = os.path.abspath(todo.pop())
        if f not in seen:
            seen.add(f)
            todo.extend(project_imports(f, root))
    return seen


def n_lines(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def scripts(root=ROOT):
    """The runnable scripts at the root (every .py there but model.py)."""
    return sorted(f for f in os.listdir(root) if f.endswith(".py") and f != "model.py")


if __name__ == "__main__":
    names = sys.argv[1:] or scripts()
    for name in names:
        files = read_set(name)
        print(f"{name:22s} {sum(map(n_lines, files)):6,} lines in {len(files):2d} files")
        if sys.argv[1:]:
            for f in sorted(files, key=n_lines, reverse=True):
                print(f"    {n_lines(f):5,}  {os.path.relpath(f, ROOT)}")
    print(f"model.py: {n_lines(os.path.join(ROOT, 'model.py'))} lines")
