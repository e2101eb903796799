"""Security suite (see tests/faults.py)."""
