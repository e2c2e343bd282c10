"""Run API-format workflows headless on a real ComfyUI server and print where the images are.

    .venv/bin/python scripts/run_workflows.py workflows/api/apply_adapter.json [...]

The server runs on a free loopback port with the base directory .host/base (set up by
scripts/setup_host.sh) and is stopped afterwards, also on failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from comfy_host import REPO_ROOT, ComfyServer, load_api_workflow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="+", type=Path, help="API-format workflow JSON files")
    parser.add_argument("--base", type=Path, default=REPO_ROOT / ".host" / "base", help="ComfyUI base directory")
    args = parser.parse_args()
    graphs = [(path, load_api_workflow(path)) for path in args.workflows]
    with ComfyServer(args.base) as server:
        print(f"ComfyUI is running at {server.url} (log: {server.log_path})")
        for path, graph in graphs:
            result = server.run_prompt(graph)
            print(f"{path.name}: {len(result.output_images)} image(s)")
            for text in result.output_texts:
                print("  | " + text.replace("\n", "\n  | "))
            for image in result.output_images:
                print(f"  {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
