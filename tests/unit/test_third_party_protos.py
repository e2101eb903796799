"""The google/rpc protos shipped for outside clients are the ones the services are built with."""

from __future__ import annotations

from pathlib import Path

import google.rpc

SHIPPED = Path(__file__).resolve().parents[2] / "third_party" / "googleapis" / "google" / "rpc"


def test_the_shipped_google_rpc_protos_equal_the_installed_package() -> None:
    installed = Path(next(iter(google.rpc.__path__)))
    names = sorted(p.name for p in SHIPPED.glob("*.proto"))
    assert names == ["code.proto", "error_details.proto", "status.proto"]
    for name in names:
        assert (SHIPPED / name).read_bytes() == (installed / name).read_bytes(), (
            f"third_party/googleapis/google/rpc/{name} differs from googleapis-common-protos: copy it anew "
            "and update third_party/googleapis/README.md")
