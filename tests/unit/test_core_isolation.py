"""core/ must be importable and testable without ComfyUI."""
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFY_IMPORT = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|comfy_extras|folder_paths|nodes|node_helpers|server)\b")


def test_core_sources_import_nothing_from_comfyui():
    offenders = [f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
                 for path in sorted((REPO_ROOT / "core").rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if COMFY_IMPORT.match(line)]
    assert offenders == [], "core/ imports ComfyUI:\n" + "\n".join(offenders)


def test_core_modules_import_in_a_process_without_comfyui():
    modules = sorted(p.stem for p in (REPO_ROOT / "core").glob("*.py") if p.stem != "__init__")
    code = ("import sys; sys.path[:0] = [sys.argv[1]]\n"
            "import importlib\n"
            f"for name in {modules!r}: importlib.import_module('core.' + name)\n"
            "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths'))\n"
            "assert not leaked, leaked\n"
            "print('ok', len(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
