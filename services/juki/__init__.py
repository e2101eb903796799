"""Juki-net mesh: a working model of the Basic Resident Registration Network."""
