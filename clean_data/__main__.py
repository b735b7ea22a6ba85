"""The cleaning CLI (run from the repository root):

    python -m clean_data --input=... --out_dir=...        clean a corpus (clean_data/clean.py)
    python -m clean_data merge --inputs=a:0.7,b:0.3 ...   mix cleaned corpora by weight (clean_data/merge.py)

Each module's globals are its settings, overridden by config files and --key=value."""
import sys

from babyllama.configurator import apply_overrides
from clean_data import clean, merge

command = merge if sys.argv[1:2] == ["merge"] else clean
apply_overrides(vars(command), sys.argv[2:] if command is merge else sys.argv[1:])
command.main()
