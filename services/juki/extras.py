"""The optional parts of the package and the extras that install them.

A service process needs only the base dependencies (what the container image installs). The rest comes
with extras, and the code that uses it imports it only where it is used, after :func:`need`:

=========  ============================  ==============================================================
extra      packages                      used by
=========  ============================  ==============================================================
``local``  pgserver                      the embedded PostgreSQL of a local mesh (``juki up``, benches)
``cli``    rich, reportlab               progress bars and tables, printed disclosures, card PDFs
``seed``   Faker                         the synthetic population (``juki up --population``, benches)
``dev``    test and build tools          the tests; includes ``local``, ``cli`` and ``seed``
=========  ============================  ==============================================================
"""

from __future__ import annotations

import importlib.util

from juki.mesh.errors import SettingsError

EXTRAS: dict[str, tuple[str, ...]] = {
    "local": ("pgserver",),
    "cli": ("rich", "reportlab"),
    "seed": ("faker",),
}
"""Each extra and the top-level modules it installs."""


class MissingExtra(SettingsError):
    """A command needs a package of an extra that is not installed; the message names the extra."""


def need(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` unless ``module`` (a top-level module of ``extra``) can be imported.

    ``what`` says what needs it, for the message (e.g. "the embedded PostgreSQL").
    """
    assert module in EXTRAS[extra], f"{module} is not a module of the {extra} extra"
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"{what} needs {module}, from the '{extra}' extra, which is not installed: "
            f"pip install 'juki[{extra}]' (or, in a checkout, pip install -e '.[{extra}]')"
        )
