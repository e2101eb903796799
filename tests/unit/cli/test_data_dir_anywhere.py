"""``--data-dir`` is accepted after every verb, as the README says, and before the sub-verb as well."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from juki.cli.main import build_parser, main


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), inherited: bool = False
           ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, bool]]:
    inherited = inherited or "--data-dir" in parser._option_string_actions
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers and path:
        yield path, parser, inherited
    for action in subparsers:
        for name, child in action.choices.items():
            yield from _verbs(child, (*path, name), inherited)


LEAVES = list(_verbs(build_parser()))


def test_the_verbs_are_found() -> None:
    names = {" ".join(path) for path, _, _ in LEAVES}
    assert {"pki issue", "pki init", "pki list", "pki revoke", "lookup", "disclose", "up"} <= names


@pytest.mark.parametrize("path", [p for p, _, takes in LEAVES if takes], ids=lambda p: " ".join(p))
def test_every_verb_under_a_data_dir_takes_it_after_the_verb(path: tuple[str, ...]) -> None:
    leaf = dict((p, parser) for p, parser, _ in LEAVES)[path]
    assert "--data-dir" in leaf._option_string_actions


def test_pki_issue_with_data_dir_after_the_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init", "--data-dir", str(tmp_path)]) == 0
    assert main(["pki", "issue", "agency", "mofa", "--data-dir", str(tmp_path)]) == 0
    assert (tmp_path / "pki" / "agency" / "mofa.crt").is_file()
    assert main(["pki", "revoke", "agency", "mofa", "--data-dir", str(tmp_path)]) == 0
    assert main(["pki", "list", "--data-dir", str(tmp_path)]) == 0
    assert "mofa" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["pki", "--data-dir", "/before", "issue", "agency", "mofa"],
    ["pki", "issue", "agency", "mofa", "--data-dir", "/before"],
    ["pki", "--data-dir", "/overridden", "issue", "agency", "mofa", "--data-dir", "/before"],
])
def test_the_place_does_not_change_the_meaning(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).data_dir == Path("/before")


def test_no_data_dir_is_none() -> None:
    assert build_parser().parse_args(["pki", "issue", "agency", "mofa"]).data_dir is None
