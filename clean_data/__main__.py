"""python -m clean_data --input=... : the cleaning pipeline (clean_data/clean.py); python -m clean_data.merge
for dataset mixing."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configurator.py
runpy.run_module("clean_data.clean", run_name="__main__")
