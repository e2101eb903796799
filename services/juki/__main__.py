"""``python -m juki`` is the ``juki`` command."""

from juki.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
