"""The Prometheus metric names the services export, derived from the code, and the names PromQL uses.

Every OpenTelemetry instrument is created in one call with a literal name (``create_counter(
"juki.rpc.server.requests")``), so the names are read from the source with :mod:`ast` and turned into
what the Prometheus exporter prints: dots become underscores, the unit becomes a suffix (``ms`` ->
``_milliseconds``, ``s`` -> ``_seconds``; an annotation unit such as ``{record}`` adds nothing),
counters end in ``_total`` and a histogram is its ``_bucket``, ``_sum`` and ``_count`` series. The
end-to-end suite checks this derivation against a real scrape of every service
(tests/e2e/test_observability.py), so a rule or panel checked against it names what a scrape shows.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "services" / "juki"

_KINDS = {
    "create_counter": "counter",
    "create_observable_counter": "counter",
    "create_up_down_counter": "gauge",
    "create_observable_up_down_counter": "gauge",
    "create_gauge": "gauge",
    "create_observable_gauge": "gauge",
    "create_histogram": "histogram",
}
# Units the exporter turns into a suffix; a unit missing here fails loudly instead of guessing.
_UNIT_SUFFIXES = {"ms": "_milliseconds", "s": "_seconds", "By": "_bytes", "": ""}


def instruments(root: Path = PACKAGE) -> dict[str, tuple[str, str]]:
    """OpenTelemetry instrument name -> (kind, unit), for every instrument created in the package."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        if "_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _KINDS and node.args):
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                raise AssertionError(f"{path}:{node.lineno}: an instrument name that is not a literal")
            unit = ""
            for keyword in node.keywords:
                if keyword.arg == "unit":
                    assert isinstance(keyword.value, ast.Constant), f"{path}:{node.lineno}: unit not a literal"
                    unit = str(keyword.value.value)
            found[first.value] = (_KINDS[node.func.attr], unit)
    return found


def prometheus_names(found: dict[str, tuple[str, str]]) -> set[str]:
    names: set[str] = set()
    for name, (kind, unit) in found.items():
        unit = "" if unit.startswith("{") and unit.endswith("}") else unit
        if unit not in _UNIT_SUFFIXES:
            raise AssertionError(f"{name}: unit {unit!r} has no known Prometheus suffix; add it here")
        base = name.replace(".", "_") + _UNIT_SUFFIXES[unit]
        if kind == "counter":
            names.add(base + "_total")
        elif kind == "histogram":
            names.update({base + "_bucket", base + "_sum", base + "_count"})
        else:
            names.add(base)
    return names


def exported() -> set[str]:
    """Every juki metric name a scrape of the services can show."""
    return prometheus_names(instruments())


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![\w:])(juki[_:][a-zA-Z0-9_:]*)")


def referenced(expressions: Iterable[str]) -> set[str]:
    """The juki metric and recording-rule names an expression uses (label values skipped)."""
    names: set[str] = set()
    for expression in expressions:
        names.update(_METRIC.findall(_STRING.sub('""', expression)))
    return names
