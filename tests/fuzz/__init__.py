"""Fuzz suite (see tests/faults.py)."""
