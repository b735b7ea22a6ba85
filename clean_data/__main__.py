"""python -m clean_data --input=... : the cleaning pipeline (clean_data/clean.py); python -m clean_data.merge
for dataset mixing, python -m clean_data.bench for the dedup benchmark. Run from the repository root."""
import runpy

runpy.run_module("clean_data.clean", run_name="__main__")
