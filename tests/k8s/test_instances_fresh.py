"""The prod overlay's per-instance files are what tools/gen_k8s_instances.py makes of the base instance."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "tools" / "gen_k8s_instances.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_k8s_instances", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_instance_files_are_fresh() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, (
        "k8s/overlays/prod/instances is stale; run `python tools/gen_k8s_instances.py`\n" + result.stderr
    )


def test_every_instance_file_is_generated_and_listed_in_the_overlay() -> None:
    tool = _tool()
    generated = {path.name for path in tool.render_all()}
    assert generated == {path.name for path in tool.OUTPUT_DIR.glob("*.yaml")}
    kustomization = (tool.OUTPUT_DIR.parent / "kustomization.yaml").read_text()
    assert all(f"instances/{name}" in kustomization for name in generated)


def test_a_hand_edit_or_a_stray_file_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = _tool()
    copy = tmp_path / "instances"
    shutil.copytree(tool.OUTPUT_DIR, copy)
    monkeypatch.setattr(tool, "OUTPUT_DIR", copy)
    assert tool.main(["--check"]) == 0
    edited = copy / "municipal-271276.yaml"
    edited.write_text(edited.read_text().replace("maxUnavailable: 1", "maxUnavailable: 2"))
    assert tool.main(["--check"]) == 1
    assert tool.main([]) == 0 and tool.main(["--check"]) == 0  # rewritten
    (copy / "municipal-999999.yaml").write_text("{}\n")
    assert tool.main(["--check"]) == 1


def test_a_trace_of_the_base_instance_is_refused() -> None:
    tool = _tool()
    assert tool._leftovers("  name: intake-prefecture-13\n", prefecture=True, municipality=False)
    assert tool._leftovers("  - spiffe://juki.local/municipality/131148\n", prefecture=False, municipality=True)
    assert not tool._leftovers("  max_wal_size: '256MB'\n  port: 5432\n  cpu: 100m\n", prefecture=True,
                               municipality=True)


def test_a_prefecture_cluster_holds_a_role_for_each_of_its_municipalities() -> None:
    import yaml

    tool = _tool()
    osaka = tool.render_prefecture(tool.Prefecture("27", "大阪府", "Osaka"),
                                   [tool.Municipality("271276", "大阪市北区 Kita-ku, Osaka"),
                                    tool.Municipality("271004", "大阪市 Osaka")])
    (cluster,) = [d for d in yaml.safe_load_all(osaka) if d and d["kind"] == "Cluster"]
    roles = [role["name"] for role in cluster["spec"]["managed"]["roles"]]
    assert roles == ["juki_intake_p27", "juki_municipal_271276", "juki_municipal_271004"]
