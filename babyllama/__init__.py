"""The library beneath the runnable scripts: what they share besides model.py (see ARCHITECTURE.md)."""
