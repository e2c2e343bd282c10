"""Benchmarks run in smoke mode (every code path at tiny sizes, nothing recorded), so they cannot rot."""
from __future__ import annotations

import subprocess
import sys

import pytest

import comfy_host

pytestmark = pytest.mark.host


def test_qr_merge_bench_smoke_run(comfy_base):
    results = comfy_host.REPO_ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes()
    run = subprocess.run([sys.executable, str(comfy_host.REPO_ROOT / "bench" / "qr_merge.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600, cwd=comfy_host.REPO_ROOT)
    assert run.returncode == 0, f"bench/qr_merge.py --smoke failed:\n{run.stderr[-4000:]}"
    assert "SD1.5 ratio ours / stock" in run.stdout and "qr_factorise" in run.stdout, run.stdout[-2000:]
    assert results.read_bytes() == before, "a smoke run must not append to bench/RESULTS.md"
