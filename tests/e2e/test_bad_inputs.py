"""Bad input through a real server, generated systematically: every case must fail with its own specific
message naming the file, key or input, the server must answer the next prompt, and no file outside the
folder a node writes to may be created or changed.

Families (the count of each is asserted, so the suite cannot shrink unnoticed):
- broken adapter files: byte-level corruption and bad contents, for each file layout the pack reads;
- absurd parameters: every numeric input of every pack node below its minimum and above its maximum, every
  combo input with a value it does not offer, every input of the wrong type (ComfyUI's own validation,
  which names the input), from the shipped workflows;
- names for the nodes that write files (.., absolute, reserved characters, existing files);
- concept words missing from the prompt, block strengths that do not parse or name no block.
"""
from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import comfy_host
import model_names as names

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "workflows" / "api").glob("*.json"))
ATTN = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # a 320 x 320 projection of the tiny UNet
MODULE_NAMES = {
    "kohya": "lora_unet_" + ATTN.replace(".", "_"),
    "peft": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "comfy": "diffusion_model." + ATTN,
    "qr": "diffusion_model." + ATTN,
}
SUFFIXES = {  # layout -> (up, down)
    "kohya": (".lora_up.weight", ".lora_down.weight"), "peft": (".lora_B.weight", ".lora_A.weight"),
    "comfy": (".lora_up.weight", ".lora_down.weight"), "qr": (".lora.q.weight", ".lora.delta_r.weight"),
}


@dataclass
class Case:
    id: str
    graph: dict
    expected: str | list[str]  # regexes the error must all match
    files: dict[str, bytes] = field(default_factory=dict)  # path under the base directory -> content

    @property
    def patterns(self) -> list[str]:
        return [self.expected] if isinstance(self.expected, str) else list(self.expected)


def factors(layout: str, up: torch.Tensor | None = None, down: torch.Tensor | None = None,
            module: str | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    up = torch.randn(320, 2, generator=g) if up is None else up
    down = torch.randn(2, 320, generator=g) if down is None else down
    name = module or MODULE_NAMES[layout]
    up_suffix, down_suffix = SUFFIXES[layout]
    return {name + up_suffix: up, name + down_suffix: down}


def header_file(header: dict | list | str, data: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text.encode())) + text.encode() + data


def info_graph(file_name: str, with_model: bool) -> dict:
    graph = {"1": {"class_type": "CSA_LoadAdapter", "inputs": {"adapter_name": file_name, "strength": 1.0,
                                                               "part": "whole file", "role": "from file"}},
             "2": {"class_type": "CSA_AdapterInfo", "inputs": {"adapter": ["1", 0]}}}
    if with_model:
        graph["3"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names.TINY_CHECKPOINT_NAME}}
        graph["2"]["inputs"]["model"] = ["3", 0]
    return graph


def file_cases() -> list[Case]:
    """Broken adapter files, for every layout."""
    cases = []
    for layout in MODULE_NAMES:
        valid = save(factors(layout))
        nan_up = torch.randn(320, 2)
        nan_up[3, 1] = float("nan")
        inf_down = torch.randn(2, 320)
        inf_down[0, 7] = float("inf")
        length = struct.unpack("<Q", valid[:8])[0]
        variants = {
            "empty": (b"", r"not a safetensors file \(0 bytes, no header\)", False),
            "five_bytes": (valid[:5], r"not a safetensors file \(5 bytes, no header\)", False),
            "header_longer_than_file": (struct.pack("<Q", len(valid) * 4) + valid[8:],
                                        r"not a safetensors file or truncated \(header says", False),
            "header_not_json": (header_file("{not json"), r"header is not JSON", False),
            "header_is_a_list": (header_file([1, 2, 3]), r"header is not a JSON object", False),
            "offsets_not_a_pair": (header_file({"x": {"dtype": "F32", "shape": [1], "data_offsets": 4}}, b"\0" * 4),
                                   r"data_offsets is not a pair", False),
            "metadata_not_an_object": (header_file({"__metadata__": [1], "x": {"dtype": "F32", "shape": [1],
                                                                             "data_offsets": [0, 4]}}, b"\0" * 4),
                                       r"__metadata__ is not a JSON object", False),
            "metadata_value_not_a_string": (header_file({"__metadata__": {"a": 5}, "x": {
                "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                r"not a readable safetensors file", False),
            "unknown_dtype": (header_file({"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                              r"not a readable safetensors file", False),
            "truncated_data": (valid[:-16], r"truncated: the header describes", False),
            "truncated_in_header": (valid[:8 + length // 2], r"not a safetensors file or truncated", False),
            "pickle_renamed": (pickle.dumps({"state_dict": [1.0, 2.0]}), r"a pickle or torch.save file renamed", False),
            "zip_renamed": (b"PK\x03\x04" + b"\0" * 60, r"a pickle or torch.save file renamed", False),
            "nan_factor": (save(factors(layout, up=nan_up)), r"contains NaN or infinite values", False),
            "inf_factor": (save(factors(layout, down=inf_down)), r"contains NaN or infinite values", False),
            "no_factors": (save({"model.junk.weight": torch.zeros(3)}), r"no adapter tensors found", False),
            "rank_mismatch": (save(factors(layout, up=torch.randn(320, 3))),
                              r"rank mismatch, up is \(320, 3\) but down is \(2, 320\)", False),
            "three_dimensional": (save(factors(layout, up=torch.randn(320, 2, 1))), r"must be 2-D \(linear\) or 4-D",
                                  False),
            "conv_up_not_1x1": (save(factors(layout, up=torch.randn(320, 2, 3, 3), down=torch.randn(2, 320, 1, 1))),
                                r"conv up factor must be 1x1", False),
            "role_not_a_role": (save(factors(layout), {"csa.role": "villain"}), r"role must be one of", False),
            "wrong_width": (save(factors(layout, down=torch.randn(2, 100))), r"does not fit .*the adapter changes a "
                            r"\(320, 100\) weight, the model's is \(320, 320\)", True),
            "made_for_sdxl": (save(factors(layout, down=torch.randn(2, 2048), up=torch.randn(640, 2),
                                           module=MODULE_NAMES[layout].replace("attn1", "attn2").replace("to_q", "to_k"))),
                              r"made for SDXL \(cross-attention width 2048\), but the model is SD15", True),
            "no_module_in_model": (save(factors(layout, module=MODULE_NAMES[layout].replace("input_blocks_1_1", "input_blocks_9_1")
                                                .replace("input_blocks.1.1", "input_blocks.9.1")
                                                .replace("down_blocks.0", "down_blocks.3"))),
                                   r"does not match this model \(SD15\): none of its 1 modules", True),
        }
        for variant, (content, expected, with_model) in variants.items():
            file_name = f"bad_{layout}_{variant}.safetensors"
            cases.append(Case(f"file-{layout}-{variant}", info_graph(file_name, with_model),
                              [re.escape(file_name), expected], {f"models/loras/{file_name}": content}))
    return cases


def workflow_nodes() -> list[tuple[str, dict, str]]:
    """(workflow name, graph, node id) for every pack node in the shipped API workflows."""
    found = []
    for path in WORKFLOWS:
        graph = json.loads(path.read_text())
        found += [(path.stem, graph, node_id) for node_id, node in sorted(graph.items())
                  if node["class_type"].startswith("CSA_")]
    return found


def parameter_cases(object_info: dict) -> list[Case]:
    """Every widget of every pack node in the shipped workflows: out of range, not offered, wrong type."""
    cases, seen = [], set()
    for workflow, graph, node_id in workflow_nodes():
        node = graph[node_id]
        spec = {**object_info[node["class_type"]]["input"].get("required", {}),
                **object_info[node["class_type"]]["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list) or name not in spec or (node["class_type"], name) in seen:
                continue
            seen.add((node["class_type"], name))
            kind, options = spec[name][0], spec[name][1] if len(spec[name]) > 1 else {}
            bad_values = []
            if kind in ("INT", "FLOAT"):
                if "min" in options:
                    bad_values.append(("below_min", options["min"] - (1 if kind == "INT" else 0.5),
                                       rf"smaller than min of {re.escape(str(options['min']))}"))
                if "max" in options:
                    bad_values.append(("above_max", options["max"] + (1 if kind == "INT" else 0.5),
                                       rf"bigger than max of {re.escape(str(options['max']))}"))
                bad_values.append(("not_a_number", "lots", r"Failed to convert an input value to a"))
            elif isinstance(kind, list) or kind == "COMBO":
                bad_values.append(("not_offered", "no-such-option.safetensors", r"not in list"))
            for label, bad, expected in bad_values:
                mutated = copy.deepcopy(graph)
                mutated[node_id]["inputs"][name] = bad
                cases.append(Case(f"param-{node['class_type']}-{name}-{label}", mutated,
                                  [expected, rf'"input_name": "{re.escape(name)}"']))
    return cases


def save_graph(filename: str, subfolder: str = "", overwrite: bool = False) -> dict:
    return {"1": {"class_type": "CSA_LoadAdapter", "inputs": {"adapter_name": names.DEMO_LORA_NAME, "strength": 1.0,
                                                              "part": "whole file", "role": "from file"}},
            "2": {"class_type": "CSA_SaveAdapter", "inputs": {"adapter": ["1", 0], "filename": filename,
                                                              "subfolder": subfolder, "key_form": "kohya",
                                                              "overwrite": overwrite}}}


BAD_NAMES = {
    "dotdot": ("../escaped", r"must be a relative name inside the folder"),
    "dotdot_deep": ("a/../../../escaped", r"must be a relative name inside the folder"),
    "absolute": ("/tmp/csa_escaped", r"must be a relative name inside the folder"),
    "nul_byte": ("bad\x00name", r"must be a relative name inside the folder"),
    "empty": ("", r"filename is empty"),
    "blank": ("   ", r"filename is empty"),
    "too_long": ("x" * 300, r"File name too long|name is too long"),
    "dotdot_in_middle": ("ok/../../escaped", r"must be a relative name inside the folder"),
}


def train_graph(filename: str) -> dict:
    """The shipped Train Adapter workflow cut to one training step and its report (an empty name means 'no file')."""
    graph = json.loads((REPO_ROOT / "workflows" / "api" / "train_adapter.json").read_text())
    graph = {k: graph[k] for k in ("1", "2", "3", "4", "14")}
    graph["3"]["inputs"].update(preview_every=0, save_every=0)
    graph["4"]["inputs"].update(steps=1, filename=filename, overwrite=False)
    return graph


def writer_cases() -> list[Case]:
    cases = []
    for label, (bad, expected) in BAD_NAMES.items():
        cases.append(Case(f"save-filename-{label}", save_graph(bad), expected))
        if label not in ("empty", "blank"):  # a trainer with no name saves no file: not an error
            cases.append(Case(f"train-filename-{label}", train_graph(bad), expected))
        if label not in ("empty", "blank", "too_long"):
            cases.append(Case(f"save-subfolder-{label}", save_graph("fine", subfolder=bad),
                              expected.replace("filename is empty", "subfolder")))
        mapper = {"1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": names.CLIP_VISION_NAME}},
                  "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": names.CLIP_L_NAME,
                                                               "type": "stable_diffusion", "device": "default"}},
                  "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0}},
                  "4": {"class_type": "CSA_TrainPromptMapper", "inputs": {
                      "images": ["3", 0], "image_folder": "", "clip_vision": ["1", 0], "clip": ["2", 0],
                      "source_label": "photo", "target_label": "sketch", "iterations": 1, "lr": 0.05, "batch_size": 2,
                      "n_ctx": 1, "regularizer_weight": 1.0, "seed": 0, "filename": bad, "overwrite": False}},
                  "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}}
        cases.append(Case(f"mapper-filename-{label}", mapper, expected))
    existing = "csa_existing_adapter"
    cases.append(Case("save-existing-file", save_graph(existing), rf"{existing}\.safetensors already exists",
                      {f"models/loras/{existing}.safetensors": b"user's precious adapter"}))
    trained = "csa_existing_trained"
    cases.append(Case("train-existing-file", train_graph(trained), rf"{trained}\.safetensors already exists",
                      {f"models/loras/{trained}.safetensors": b"user's precious trained adapter"}))
    return cases


def prompt_cases() -> list[Case]:
    base = json.loads((REPO_ROOT / "workflows" / "api" / "localized_residual.json").read_text())
    node_id = next(k for k, v in base.items() if v["class_type"] == "CSA_ApplyLocalizedResidual")
    cases = []
    for words, expected in (("zebra", r"concept word 'zebra' is not in the prompt"),
                            ("circle zebra", r"concept word 'zebra' is not in the prompt"),
                            ("qqqqqqq", r"concept word 'qqqqqqq' is not in the prompt"),
                            ("", r"concept_words is empty"), (" , ", r"concept_words is empty")):
        graph = copy.deepcopy(base)
        graph[node_id]["inputs"]["concept_words"] = words
        cases.append(Case(f"concept-words-{words.strip() or 'blank'}", graph, expected))
    apply = json.loads((REPO_ROOT / "workflows" / "api" / "apply_adapter.json").read_text())
    apply_id = next(k for k, v in apply.items() if v["class_type"] == "CSA_ApplyAdapters")
    for text, expected in (("input_blocks.1 = lots", r"cannot read 'input_blocks.1 = lots'"),
                           ("=1", r"cannot read '=1'"), ("up_blocks.0=1", r"name \['up_blocks.0'\], which this model"),
                           ("middle_block: 1e999x", r"cannot read")):
        graph = copy.deepcopy(apply)
        graph[apply_id]["inputs"]["block_strengths"] = text
        cases.append(Case(f"block-strengths-{re.sub(r'[^a-z0-9]+', '_', text)}", graph, expected))
    return cases


WRITING_FOLDERS = ("models/loras/", "models/prompt_mappers/")


def tree_state(root: Path, skip: set[str]) -> dict[str, str]:
    """Hashes of every file under root (server log, temp and output folders left out)."""
    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and not any(relative.startswith(s) for s in skip):
            state[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def error_text(failure: Exception) -> str:
    return str(failure)


def test_every_bad_input_gets_its_own_error_and_nothing_else_changes(comfy_server, tmp_path):
    object_info = comfy_server.get_json("/object_info")
    families = {"files": file_cases(), "parameters": parameter_cases(object_info), "writers": writer_cases(),
                "prompts": prompt_cases()}
    cases = [case for family in families.values() for case in family]
    assert len({c.id for c in cases}) == len(cases), "case ids must be distinct"
    assert len(cases) >= 200, {name: len(family) for name, family in families.items()}
    base = comfy_server.base_directory
    for case in cases:
        for relative, content in case.files.items():
            (base / relative).parent.mkdir(parents=True, exist_ok=True)
            (base / relative).write_bytes(content)
    skip = {"server.log", "temp/", "output/", "user/", "input/"}
    outside = Path("/tmp/csa_escaped.safetensors")
    before = tree_state(base, skip)
    failures = []
    for case in cases:
        try:
            comfy_server.run_prompt(case.graph, timeout=120)
        except comfy_host.PromptFailed as error:
            missing = [p for p in case.patterns if not re.search(p, error_text(error))]
            if missing:
                failures.append(f"{case.id}: expected /{missing}/, got: {error_text(error)[-600:]}")
        else:
            failures.append(f"{case.id}: succeeded; expected /{case.expected}/")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    after = tree_state(base, skip)
    changed = sorted(k for k in before if after.get(k) != before[k])
    created = sorted(set(after) - set(before))
    assert not changed, f"bad input changed or removed files: {changed}"
    # a prompt whose other outputs validated still runs them (ComfyUI), so a writing node may save into its folder
    assert all(k.startswith(WRITING_FOLDERS) for k in created), f"files created outside the writing folders: {created}"
    assert not outside.exists() and not (base / "models" / "escaped.safetensors").exists()
    # the server still answers and still runs a good prompt
    result = comfy_server.run_prompt(info_graph(names.DEMO_LORA_NAME, with_model=True))
    assert any("mapped" in text for text in result.output_texts)
