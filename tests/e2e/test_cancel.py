"""Cancel through a real server: training and sampling stop, the server returns to idle, no partial file
remains, and the next prompt works."""
from __future__ import annotations

import json
import time
import uuid

import pytest

import model_names as names
from comfy_host import REPO_ROOT

pytestmark = pytest.mark.e2e


def submit(server, graph: dict) -> str:
    return server.post_json("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]


def wait_until_running(server, prompt_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = server.get_json("/queue")["queue_running"]
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} never started")


def interrupt_and_wait(server, prompt_id: str, after: float, timeout: float = 300) -> dict:
    wait_until_running(server, prompt_id)
    time.sleep(after)
    server.post_json("/interrupt", {})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if history and history["status"].get("completed") is not None:
            queue = server.get_json("/queue")
            assert not queue["queue_running"] and not queue["queue_pending"], "the server is not idle after a cancel"
            return history
        time.sleep(0.2)
    raise TimeoutError("the cancelled prompt never ended")


def interrupted(history: dict) -> bool:
    return any(kind == "execution_interrupted" for kind, _ in history["status"]["messages"])


def a_small_prompt_works(server) -> None:
    graph = {"1": {"class_type": "CSA_LoadAdapter", "inputs": {"adapter_name": names.DEMO_LORA_NAME, "strength": 1.0,
                                                               "part": "whole file", "role": "from file"}},
             "2": {"class_type": "CSA_AdapterInfo", "inputs": {"adapter": ["1", 0]}}}
    assert any("modules" in text for text in server.run_prompt(graph).output_texts)


def test_cancelling_training_leaves_no_file_and_the_server_idle(comfy_server):
    mappers = comfy_server.base_directory / "models" / "prompt_mappers"
    before = sorted(p.name for p in mappers.rglob("*")) if mappers.exists() else []
    graph = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": names.CLIP_VISION_NAME}},
             "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": names.CLIP_L_NAME, "type": "stable_diffusion",
                                                          "device": "default"}},
             "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0}},
             "4": {"class_type": "CSA_TrainPromptMapper", "inputs": {
                 "images": ["3", 0], "image_folder": "", "clip_vision": ["1", 0], "clip": ["2", 0],
                 "source_label": "photo", "target_label": "sketch", "iterations": 100000, "lr": 0.05, "batch_size": 2,
                 "n_ctx": 1, "regularizer_weight": 1.0, "seed": 0, "filename": "cancelled_mapper", "overwrite": False}},
             "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}}
    history = interrupt_and_wait(comfy_server, submit(comfy_server, graph), after=3.0)
    assert interrupted(history)
    after = sorted(p.name for p in mappers.rglob("*")) if mappers.exists() else []
    assert after == before, f"a cancelled training left files: {sorted(set(after) - set(before))}"
    a_small_prompt_works(comfy_server)


def test_cancelling_sampling_returns_to_idle(comfy_server):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names.WORLD_CHECKPOINT_NAME}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
             "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 10000, "cfg": 4.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "positive": ["2", 0], "negative": ["2", 0],
                                                        "latent_image": ["3", 0], "denoise": 1.0}},
             "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
             "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "csa/cancelled"}}}
    history = interrupt_and_wait(comfy_server, submit(comfy_server, graph), after=2.0)
    assert interrupted(history)
    assert not list((comfy_server.base_directory / "output" / "csa").glob("cancelled*"))
    a_small_prompt_works(comfy_server)


def test_cancelling_adapter_training_with_periodic_saves_leaves_only_whole_files(comfy_server):
    """Train Adapter (the shipped workflow, made long, saving every 2 steps) cancelled mid-run: the server is idle,
    no final file and no temporary file exist, every periodic save that does exist reads as a whole adapter."""
    from core.adapter_file import read_safetensors

    graph = json.loads((REPO_ROOT / "workflows" / "api" / "train_adapter.json").read_text())
    graph["4"]["inputs"].update(steps=100000, filename="cancelled_adapter", overwrite=False)
    graph["3"]["inputs"].update(save_every=2, preview_every=0)
    loras = comfy_server.base_directory / "models" / "loras"
    prompt_id = submit(comfy_server, graph)
    deadline = time.monotonic() + 300
    while not list(loras.glob("cancelled_adapter_step*.safetensors")):  # training is under way: cancel it now
        assert time.monotonic() < deadline, "no periodic save appeared"
        time.sleep(0.1)
    history = interrupt_and_wait(comfy_server, prompt_id, after=0.0)
    assert interrupted(history)
    left = sorted(p.name for p in loras.glob("*cancelled_adapter*"))
    assert any(name.startswith("cancelled_adapter_step") for name in left), left
    assert "cancelled_adapter.safetensors" not in left and not [n for n in left if n.endswith(".partial")], left
    for name in left:
        if name.endswith(".safetensors"):
            read_safetensors(loras / name)  # a periodic save is complete or absent, never cut short
    a_small_prompt_works(comfy_server)
