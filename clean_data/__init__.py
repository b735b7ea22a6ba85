"""Corpus reading and cleaning, shared by the cleaning pipeline and data_process.py. Torch-free."""
