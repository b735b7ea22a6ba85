"""Corpus cleaning: quality filters, exact / MinHash / SimHash dedup, dataset mixing (python -m clean_data). Torch-free."""
