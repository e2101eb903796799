"""Seeding a mesh with a synthetic population: :mod:`.population` generates the people (deterministic by
seed; Faker's name lists, the ``seed`` extra), :mod:`.registers` writes them into the municipal registers
of a running local mesh and sends each register up through the real path.

Not part of any service: the services run without it (and without Faker). ``juki up``, ``juki demo``,
``juki bench soak`` and the tests use it.
"""
