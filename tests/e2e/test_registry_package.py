"""The Comfy Registry package: git-tracked files minus .comfyignore (comfy node pack's rule, [tool.comfy] includes being
empty) is small, holds no developer files, and is a complete node pack for a real ComfyUI server."""
from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import comfy_host

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_LIMIT_BYTES = 2_000_000  # the nodes, core math and templates (0.7 MB measured); the git clone is ~120 MB
DEVELOPER_FOLDERS = ("bench/", "tests/", "scripts/", ".ci/")


def ignore_patterns() -> list[str]:
    """.comfyignore's patterns: 'folder/' (everything below it) or a path; the matcher below reads no other form."""
    lines = [line.strip() for line in (REPO_ROOT / ".comfyignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    unread = [p for p in patterns if any(c in p for c in "*?[!")]
    assert not unread, f".comfyignore uses patterns this test does not read: {unread}"
    return patterns


def package_files() -> list[str]:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    patterns = ignore_patterns()
    return [path for path in tracked.splitlines()
            if not any(path.startswith(p) if p.endswith("/") else path == p for p in patterns)]


def test_the_registry_package_is_small_and_holds_no_developer_files():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert config["includes"] == [], "includes add files to the package; this test would have to count them"
    assert config["requires-comfyui"] == ">=0.3.75"
    files = package_files()
    size = sum((REPO_ROOT / f).stat().st_size for f in files)
    print(f"\nregistry package: {len(files)} files, {size / 1e6:.2f} MB unpacked")
    assert size < PACKAGE_LIMIT_BYTES
    assert not [f for f in files if f.startswith(DEVELOPER_FOLDERS) or f.endswith(".safetensors")]
    assert {"__init__.py", "README.md", "pyproject.toml", "requirements.txt"} <= set(files)


def test_a_server_loads_every_node_from_the_registry_package(tmp_path):
    pack = tmp_path / "custom_nodes" / comfy_host.PACK_FOLDER_NAME
    for name in package_files():
        (pack / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, pack / name)
    for sub in ("input", "output", "temp", "user", "models"):
        (tmp_path / sub).mkdir(exist_ok=True)
    server = comfy_host.ComfyServer(tmp_path)
    server.start()
    try:
        ours = sorted(n for n in server.get_json("/object_info") if n.startswith("CSA_"))
        templates = server.get_json("/workflow_templates").get(comfy_host.PACK_FOLDER_NAME, [])
        log = server.log_text()
    finally:
        server.stop()
    assert len(ours) == 33, (ours, log[-3000:])  # every node the pack registers (tests/unit/test_readme.py counts them)
    failed = [line for line in log.splitlines() if ("IMPORT FAILED" in line or "Cannot import" in line)
              and comfy_host.PACK_FOLDER_NAME in line]
    assert not failed, log[-3000:]
    shipped = sorted(Path(f).stem for f in package_files() if f.startswith("workflows/") and f.count("/") == 1
                     and f.endswith(".json"))
    assert sorted(templates) == shipped and shipped, "the template browser lists every shipped workflow"
