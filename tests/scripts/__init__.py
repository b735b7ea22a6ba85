"""Tests of one root script or package command line each, run as users run them: see tests/conftest.py."""
