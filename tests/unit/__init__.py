"""In-process tests, one file per library module (and model.py): see tests/conftest.py."""
