"""Chaos suite (see tests/faults.py)."""
