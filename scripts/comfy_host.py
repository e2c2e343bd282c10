"""Everything that knows how to start ComfyUI on this machine, in one place.

Used by the tiny-model builder, the demo runner and the test suite. Two ways in:

- ``import_comfyui(comfy_dir)``: import ComfyUI into this process on the CPU (no server).
- ``ComfyServer``: a real ``main.py`` server on a free loopback port, with a base directory that holds
  this pack in ``custom_nodes`` and the models; ``run_prompt`` submits an API-format graph through
  ``POST /prompt`` and waits for its history entry.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import model_names as names

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFYUI_DIR = REPO_ROOT / ".host" / "ComfyUI"
TINY_MODELS_DIR = REPO_ROOT / ".cache" / "tiny-models"
PACK_FOLDER_NAME = "content_style_adapters"


def import_comfyui(comfy_dir: Path = COMFYUI_DIR, base_directory: Path | None = None) -> None:
    """Import ComfyUI in-process, CPU only, without parsing this process's command line.

    ``base_directory`` plays the role of ``--base-directory``: it must be set before folder_paths is
    first imported, because folder_paths reads it at import time.
    """
    path = str(Path(comfy_dir).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    if base_directory is not None:
        if "folder_paths" in sys.modules:
            raise RuntimeError("folder_paths was imported before the base directory was set")
        comfy.cli_args.args.base_directory = str(Path(base_directory).resolve())


def load_pack_in_process(base_directory: Path) -> dict:
    """Load this pack the way ComfyUI does (nodes.load_custom_node) and return ComfyUI's node mappings."""
    import asyncio

    import nodes

    pack_path = Path(base_directory) / "custom_nodes" / PACK_FOLDER_NAME
    if not asyncio.run(nodes.load_custom_node(str(pack_path))):
        raise RuntimeError(f"ComfyUI could not load the pack from {pack_path}")
    return nodes.NODE_CLASS_MAPPINGS


def pack_module(base_directory: Path, name: str):
    """A submodule of the pack as ComfyUI imported it (ComfyUI names the package after its path)."""
    import importlib

    package = str(Path(base_directory) / "custom_nodes" / PACK_FOLDER_NAME).replace(".", "_x_")
    return importlib.import_module(f"{package}.{name}")


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        return
    try:
        target.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    except OSError:
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)


def make_base_directory(base: Path, models_dir: Path = TINY_MODELS_DIR) -> Path:
    """Lay out a ComfyUI base directory: the pack in custom_nodes, tiny models in models/."""
    base = Path(base)
    link_or_copy(REPO_ROOT, base / "custom_nodes" / PACK_FOLDER_NAME)
    for checkpoint in (names.TINY_CHECKPOINT_NAME, names.WORLD_CHECKPOINT_NAME):
        if (models_dir / checkpoint).exists():
            link_or_copy(models_dir / checkpoint, base / "models" / "checkpoints" / checkpoint)
    for adapter in (names.DEMO_LORA_NAME, names.DEMO_CONTENT_NAME, *names.DEMO_BLORA_NAMES):
        link_or_copy(models_dir / adapter, base / "models" / "loras" / adapter)
    for adapter in (*(name for pair in names.WORLD_DEMO_ADAPTERS.values() for name in pair), names.WORLD_DEMO_B4M_MADE,
                    names.WORLD_DEMO_RESIDUAL):
        if (names.WORLD_ADAPTERS_DIR / adapter).exists():
            link_or_copy(names.WORLD_ADAPTERS_DIR / adapter, base / "models" / "loras" / adapter)
    for folder, name in (("prompt_mappers", names.DEMO_MAPPER_NAME), ("text_encoders", names.CLIP_L_NAME),
                         ("clip_vision", names.CLIP_VISION_NAME)):
        link_or_copy(models_dir / name, base / "models" / folder / name)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    world_training_folder(base / "input" / names.WORLD_TRAINING_FOLDER)
    world_style_folder(base / "input" / names.WORLD_STYLE_FOLDER)
    return base


def world_training_folder(folder: Path, per_style: int = 2) -> None:
    """Star pictures of the miniature world (a held-out shape) in every base style, each with a same-named .txt
    caption 'a <style> {trigger}' (kohya's convention): the training workflow's images."""
    if folder.is_dir():
        return
    sys.path.insert(0, str(REPO_ROOT / "bench" / "world"))
    from PIL import Image
    from world import BASE_STYLES, render

    folder.mkdir(parents=True)
    for style in BASE_STYLES:
        for index in range(per_style):
            Image.fromarray(render("star", style, 700 + index).image).save(folder / f"star_{style}_{index}.png")
            (folder / f"star_{style}_{index}.txt").write_text(f"a {style} {{trigger}}\n")


def world_style_folder(folder: Path) -> None:
    """Zigzag pictures (the held-out style) of every base shape, each captioned 'a {trigger} <shape>': the style side
    of the B4M training workflow."""
    if folder.is_dir():
        return
    sys.path.insert(0, str(REPO_ROOT / "bench" / "world"))
    from PIL import Image
    from world import BASE_SHAPES, render

    folder.mkdir(parents=True)
    for shape in BASE_SHAPES:
        Image.fromarray(render(shape, "zigzag", 700).image).save(folder / f"zigzag_{shape}.png")
        (folder / f"zigzag_{shape}.txt").write_text(f"a {{trigger}} {shape}\n")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PromptFailed(RuntimeError):
    """ComfyUI rejected a prompt or finished it with an error."""


@dataclass
class PromptResult:
    prompt_id: str
    history: dict
    images_by_node: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def output_images(self) -> list[Path]:
        return [path for paths in self.images_by_node.values() for path in paths]

    @property
    def output_texts(self) -> list[str]:
        """Text that output nodes showed (PreviewAny, Adapter Info, Save Adapter, ...)."""
        return [text for out in self.history.get("outputs", {}).values() for text in out.get("text", [])]

    @property
    def executed_nodes(self) -> set[str]:
        return set(self.history.get("outputs", {}))


class ComfyServer:
    """A real ComfyUI server process; use as a context manager so it is always stopped."""

    def __init__(self, base_directory: Path, comfy_dir: Path = COMFYUI_DIR, python: str = sys.executable,
                 log_path: Path | None = None):
        self.base_directory = Path(base_directory)
        self.comfy_dir = Path(comfy_dir)
        self.python = python
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.base_directory / "server.log"
        self.process: subprocess.Popen | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        command = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_directory), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch", "--disable-api-nodes",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                self.get_json("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s; log:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if Path(self.log_path).exists() else ""

    # -- HTTP ----------------------------------------------------------------------------------
    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as error:
            raise PromptFailed(f"POST {path} answered {error.code}: {error.read().decode(errors='replace')}") from error

    def run_prompt(self, graph: dict, timeout: float = 600.0) -> PromptResult:
        """Submit an API-format graph and wait until ComfyUI has finished it."""
        answer = self.post_json("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        if answer.get("node_errors"):  # ComfyUI still runs the outputs that validated; a user sees these errors
            self.drop_prompt(answer.get("prompt_id"))
            raise PromptFailed(f"the prompt did not validate: {json.dumps(answer['node_errors'])}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if history and history.get("status", {}).get("completed") is not None:
                status = history["status"]
                if status.get("status_str") != "success":
                    errors = [f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                              f"{data.get('exception_message')}"
                              for kind, data in status.get("messages") or [] if kind == "execution_error"]
                    raise PromptFailed(f"prompt {prompt_id} ended with {status.get('status_str')}: "
                                       + ("; ".join(errors) or json.dumps(status.get("messages"))[-4000:]))
                return PromptResult(prompt_id, history, self._images_by_node(history))
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def drop_prompt(self, prompt_id: str | None, timeout: float = 120.0) -> None:
        """Take a prompt off the queue, stopping it if it already runs, and wait until the server is past it."""
        if not prompt_id:
            return
        self.post_json("/queue", {"delete": [prompt_id]})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = self.get_json("/queue")
            if prompt_id not in [item[1] for item in queue["queue_running"] + queue["queue_pending"]]:
                return
            self.post_json("/interrupt", {})
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} could not be stopped within {timeout:.0f} s")

    def _images_by_node(self, history: dict) -> dict[str, list[Path]]:
        images = {}
        for node_id, node_output in history.get("outputs", {}).items():
            for image in node_output.get("images", []):
                folder = self.base_directory / image.get("type", "output") / image.get("subfolder", "")
                images.setdefault(node_id, []).append(folder / image["filename"])
        return images


def load_api_workflow(path: Path) -> dict:
    graph = json.loads(Path(path).read_text())
    if not isinstance(graph, dict) or not all(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        raise ValueError(f"{path} is not an API-format workflow (expected {{node_id: {{class_type, inputs}}}})")
    return graph
