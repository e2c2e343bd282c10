"""The pack inside a real ComfyUI server: loading, /object_info, and every API workflow end to end."""
from __future__ import annotations

from pathlib import Path

import pytest

import comfy_host
import model_names as names
from support.images import assert_real_images, expected_image_size

pytestmark = pytest.mark.e2e

API_WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows" / "api").glob("*.json"))


def test_server_loaded_the_pack_without_import_errors(comfy_server):
    log = comfy_server.log_text()
    failed = [line for line in log.splitlines() if "(IMPORT FAILED)" in line and comfy_host.PACK_FOLDER_NAME in line]
    assert failed == [], failed
    assert any(comfy_host.PACK_FOLDER_NAME in line for line in log.splitlines() if "seconds:" in line), \
        "the pack is not in ComfyUI's custom node import list"


def test_object_info_lists_every_node_the_pack_registers(comfy_server, comfy):
    from_pack = {node_id for node_id, cls in comfy.items()
                 if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == f"custom_nodes.{comfy_host.PACK_FOLDER_NAME}"}
    assert from_pack, "the in-process load registered no node for the pack"
    info = comfy_server.get_json("/object_info")
    missing = sorted(from_pack - set(info))
    assert missing == [], f"/object_info lacks {missing}"
    for node_id in from_pack:
        node = info[node_id]
        assert node_id.startswith("CSA_")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(node.get("output_tooltips", [])), f"{node_id} has an output without tooltip"


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=[p.stem for p in API_WORKFLOWS])
def test_api_workflow_runs_and_saves_real_images(comfy_server, workflow):
    graph = comfy_host.load_api_workflow(workflow)
    result = comfy_server.run_prompt(graph)
    save_nodes = [node_id for node_id, node in graph.items() if node["class_type"] == "SaveImage"]
    assert save_nodes and set(result.images_by_node) == set(save_nodes), "every SaveImage must have saved"
    for node_id in save_nodes:
        assert_real_images(result.images_by_node[node_id], expected_image_size(graph, node_id))


def test_b4m_workflow_on_every_linear_layer_saves_convs_and_feed_forwards(comfy_server):
    """The B4M workflow with both runs on 'all linear': it runs through the server, and the made file holds the 1x1
    conv proj_in / proj_out and the feed-forwards beside the attention projections, with the runs' keys."""
    from safetensors import safe_open

    graph = comfy_host.load_api_workflow(API_WORKFLOWS[0].parent / "train_b4m.json")
    trainers = [node for node in graph.values() if node["class_type"] in ("CSA_TrainB4MContent", "CSA_TrainB4MStyle")]
    made = [node for node in graph.values() if node["class_type"] == "CSA_B4MMake"]
    assert len(trainers) == 2 and len(made) == 1
    for node in (*trainers, *made):
        node["inputs"]["filename"] = f"e2e_all_linear_{node['class_type'].lower()}"
        node["inputs"]["overwrite"] = False
    for node in trainers:
        node["inputs"]["targets"] = "all linear"
    result = comfy_server.run_prompt(graph)
    for node_id in (i for i, node in graph.items() if node["class_type"] == "SaveImage"):
        assert_real_images(result.images_by_node[node_id], expected_image_size(graph, node_id))
    loras = comfy_server.base_directory / "models" / "loras"
    keys = {}
    for node in (*trainers, *made):
        with safe_open(loras / f"{node['inputs']['filename']}.safetensors", "pt") as file:
            keys[node["class_type"]] = {key.rsplit(".lora.", 1)[0] for key in file.keys()}
    modules = keys["CSA_B4MMake"]
    assert keys["CSA_TrainB4MContent"] == keys["CSA_TrainB4MStyle"] == modules
    for part in ("attn1.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"):
        assert any(module.endswith(part) for module in modules), f"no {part} module in the made file"


def test_every_ui_workflow_reads_back_as_its_api_twin(comfy_server):
    import json

    from workflow_formats import twins, ui_to_api

    object_info = comfy_server.get_json("/object_info")
    pairs = twins()
    assert pairs, "no API workflows"
    for ui_path, api_path in pairs:
        assert ui_path.is_file(), f"{api_path.name} has no UI twin; run scripts/workflow_formats.py --write"
        ui = json.loads(ui_path.read_text())
        assert ui_to_api(ui, object_info) == json.loads(api_path.read_text()), f"{ui_path.name} drifted from its twin"
    ui_only = sorted(p.name for p in ui_path.parent.glob("*.json")) if pairs else []
    assert ui_only == sorted(ui.name for ui, _ in pairs), "a UI workflow has no API twin in workflows/api/"


def test_saved_adapter_loads_in_stock_lora_loader_through_the_server(comfy_server):
    comfy_server.run_prompt(comfy_host.load_api_workflow(API_WORKFLOWS[0].parent / "apply_adapter.json"))
    saved = comfy_server.base_directory / "models" / "loras" / "csa_demo_resaved.safetensors"
    assert saved.is_file()
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names.TINY_CHECKPOINT_NAME}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": saved.name,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a dotted ring"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["3", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "csa/stock_reload"}},
    }
    result = comfy_server.run_prompt(graph)
    assert_real_images(result.output_images, (64, 64))
    assert "lora key not loaded" not in comfy_server.log_text()


def test_a_corrupt_adapter_fails_its_prompt_but_not_the_server(comfy_server):
    corrupt = comfy_server.base_directory / "models" / "loras" / "e2e_corrupt.safetensors"
    corrupt.write_bytes((200).to_bytes(8, "little") + b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')
    graph = {"1": {"class_type": "CSA_LoadAdapter", "inputs": {"adapter_name": corrupt.name, "strength": 1.0,
                                                               "part": "whole file", "role": "from file"}},
             "2": {"class_type": "CSA_AdapterInfo", "inputs": {"adapter": ["1", 0]}}}
    with pytest.raises(comfy_host.PromptFailed, match="e2e_corrupt.safetensors: not a safetensors file or truncated"):
        comfy_server.run_prompt(graph)
    assert comfy_server.get_json("/system_stats")["system"]
