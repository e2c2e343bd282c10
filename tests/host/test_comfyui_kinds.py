"""Every kind of adapter ComfyUI's own loader reads, against stock LoraLoader on the tiny SD1.5 model.

The main files are made as a ComfyUI user makes them: TrainLoraNode (each algorithm it offers) saved by SaveLoRA,
with the bias and norm diffs it trains. The other kinds (DoRA, Tucker, BOFT, GLoRA, full-weight diffs, set weights,
norm diffs) are hand-built from the key names in comfy/lora.py and comfy/weight_adapter/.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.comfy_trainer import ALGORITHMS, offered_algorithms, train_and_save
from support.lora_files import OTHER_KIND_MODULES, other_kind_file
from support.weights import patched_weights

pytestmark = pytest.mark.host

KIND_NAMES = {"LoRA": "lora", "LoHa": "loha", "LoKr": "lokr", "OFT": "oft"}
FLOAT32_PRECISION = 1e-6  # of a layer's largest weight: a few float32 ulps


@pytest.fixture(scope="module")
def loras(comfy_base):
    return comfy_base / "models" / "loras"


@pytest.fixture(scope="module")
def trained(comfy, comfy_base, tiny_sd15, loras):
    """{algorithm: file name in loras/}: one file per TrainLoraNode algorithm, saved by SaveLoRA."""
    model, clip, _ = tiny_sd15
    return {algorithm: train_and_save(model, clip, algorithm, loras, comfy_base / "output") for algorithm in ALGORITHMS}


@pytest.fixture(scope="module")
def shapes(tiny_sd15):
    return {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}


def load(comfy, name, strength=1.0):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part="whole file",
                                            role="from file").args[0]


def apply(comfy, model, adapter):
    return comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args


def qr_merge(comfy, model, adapter, lam=0.5):
    return comfy["CSA_QRMerge"].execute(model=model, content=adapter, style=adapter, lambda_content=lam,
                                        lambda_style=lam, interference="off").args


def stock(comfy, model, clip, name, strength):
    return comfy["LoraLoader"]().load_lora(model, clip, name, strength, 0.0)[0]


def max_difference(ours, theirs, keys, relative: bool = False) -> float:
    """max |ours - theirs| over the keys' patched weights; relative: per key, over the largest |theirs| entry."""
    a, b = patched_weights(ours, keys), patched_weights(theirs, keys)
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() if relative else 1.0)) for k in keys)


def test_the_tested_algorithms_are_those_the_trainer_offers(comfy):
    assert offered_algorithms() == list(ALGORITHMS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trained_file_applies_exactly_like_stock_loader(comfy, tiny_sd15, trained, algorithm):
    model, clip, _ = tiny_sd15
    ours, _, report = apply(comfy, model, load(comfy, trained[algorithm], strength=0.7))
    reference = stock(comfy, model, clip, trained[algorithm], 0.7)
    changed = set(reference.patches)
    biases = sum(k.endswith(".bias") for k in changed)
    modules = len(changed) - biases
    assert biases > 0 and set(ours.patches) == changed, "every weight, bias and norm stock changes"
    difference = max_difference(ours, reference, changed)
    print(f"\n{algorithm}: {len(changed)} tensors, max |ours - stock| = {difference:.2e}")
    assert difference == 0.0, "the same ComfyUI patches as stock"
    assert f"{modules} of {modules} modules mapped onto SD15 (" in report and "not used" not in report
    assert f"{KIND_NAMES[algorithm]} " in report and f"bias diff {biases}" in report and "weight diff" in report
    assert model.patches == {}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_merge_of_a_trained_file_with_itself_equals_stock_at_one(comfy, tiny_sd15, trained, algorithm, loras):
    model, clip, _ = tiny_sd15
    patched, merged, report = qr_merge(comfy, model, load(comfy, trained[algorithm]))
    reference = stock(comfy, model, clip, trained[algorithm], 1.0)
    changed = set(reference.patches)
    assert set(patched.patches) == changed
    difference = max_difference(patched, reference, changed, relative=True)
    print(f"\n{algorithm} merged 0.5 + 0.5: max |ours - stock at 1| = {max_difference(patched, reference, changed):.2e}"
          f" ({difference:.1e} of the layer's largest weight)")
    assert difference <= FLOAT32_PRECISION
    errors = [float(e) for e in re.findall(r"relative error (\S+)", report)]
    matrices = sum(not k.endswith(".bias") and reference.model.state_dict()[k].ndim > 1 for k in changed)
    assert len(errors) == (0 if algorithm == "LoRA" else 2 * matrices) and max(errors, default=0) < 1e-6
    assert f"{len(changed) - matrices} biases and norm weights: changes summed λ-weighted and carried as diffs" in report
    path = comfy["CSA_SaveAdapter"].execute(adapter=merged, filename=f"merged_{algorithm}", subfolder="",
                                            key_form="comfy", overwrite=True).args[0]
    keys = load_file(path)
    assert any(k.endswith(".diff_b") for k in keys) and any(k.endswith(".diff") for k in keys)
    reloaded = stock(comfy, model, clip, f"merged_{algorithm}.safetensors", 1.0)
    assert set(reloaded.patches) == changed and max_difference(reloaded, patched, changed) == 0.0


def test_convert_states_the_rank_reduction_per_layer_and_carries_diffs(comfy, tiny_sd15, trained):
    model, clip, _ = tiny_sd15
    converted, report = comfy["CSA_ConvertToQRLoRA"].execute(model=model, adapter=load(comfy, trained["LoKr"]),
                                                             rank=8).args
    layers = [re.fullmatch(r"\S+: lokr ΔW of rank (\d+) -> QR-LoRA rank (\d+), (\S+) of ΔW outside span\(Q\); W.s rank-r fit error \S+", line)
              for line in report.splitlines() if " -> QR-LoRA rank " in line]
    assert layers and all(layers)
    reduced = [m for m in layers if int(m.group(2)) < int(m.group(1))]
    assert all(int(m.group(2)) <= 8 for m in layers) and len(reduced) > len(layers) - 3, "LoKr changes are full rank"
    assert all(0.0 < float(m.group(3)) < 1.0 for m in reduced)
    assert converted.method == "qr-lora" and {"bias diff", "weight diff"} <= set(converted.kinds)
    patched = apply(comfy, model, converted)[0]
    reference = stock(comfy, model, clip, trained["LoKr"], 1.0)
    vectors = [k for k in reference.patches if reference.model.state_dict()[k].ndim == 1]
    assert max_difference(patched, reference, vectors, relative=True) <= FLOAT32_PRECISION


def test_adapter_info_shows_the_kinds(comfy, tiny_sd15, trained):
    adapter = load(comfy, trained["LoHa"])
    text = comfy["CSA_AdapterInfo"].execute(adapter=adapter, model=tiny_sd15[0]).args[0]
    counts = adapter.kinds
    assert set(counts) == {"loha", "bias diff", "weight diff"}
    assert "kinds " + ", ".join(f"{k} {n}" for k, n in counts.items()) in text
    assert f"{len(adapter.module_names)} of {len(adapter.module_names)} modules mapped onto SD15" in text


def test_keys_not_used_are_named_with_the_reason(comfy, tiny_sd15, trained, loras):
    model, _, _ = tiny_sd15
    tensors = load_file(str(loras / trained["LoRA"]))
    tensors["diffusion_model.input_blocks.1.1.proj_in.lora_magnitude_vector"] = torch.ones(320)
    tensors["model.junk"] = torch.zeros(3)
    tensors["diffusion_model.out.0.alpha"] = torch.tensor(4.0)  # beside out.0's norm diffs, it scales nothing
    tensors["text_encoders.clip_l.transformer.text_model.final_layer_norm.diff_b"] = torch.zeros(768)
    save_file(tensors, str(loras / "with_unknown.safetensors"))
    adapter = load(comfy, "with_unknown.safetensors")
    _, _, report = apply(comfy, model, adapter)
    lines = report.splitlines()
    assert "; 3 keys of the file not used (below)" in lines[0] and " of 97 modules mapped" in lines[0]
    assert ("  not used, unknown kind: diffusion_model.input_blocks.1.1.proj_in.lora_magnitude_vector, model.junk"
            in lines)
    assert "  not used, refused: an alpha with no factors to scale: diffusion_model.out.0.alpha" in lines
    assert ("  not used, no target in this model: text_encoders.clip_l.transformer.text_model.final_layer_norm"
            in lines)
    info = comfy["CSA_AdapterInfo"].execute(adapter=adapter).args[0]
    assert "keys not used (3): diffusion_model.input_blocks.1.1.proj_in.lora_magnitude_vector (unknown kind)" in info


def test_run_time_adapters_refuse_other_kinds_by_name(comfy, comfy_base, tiny_sd15, trained):
    import comfy_host

    runtime = comfy_host.pack_module(comfy_base, "nodes.runtime_adapters")
    with pytest.raises(ValueError, match=r"csa_trained_loha.*run-time adapters add low-rank ΔW x, but 96 modules are "
                                         r"bias diff, loha, weight diff .*Apply Adapters"):
        runtime.low_rank_targets(load(comfy, trained["LoHa"]), tiny_sd15[0])


@pytest.mark.parametrize("kind", sorted(OTHER_KIND_MODULES))
def test_other_kinds_apply_and_merge_like_stock(comfy, tiny_sd15, shapes, loras, kind):
    model, clip, _ = tiny_sd15
    name = f"kind_{kind.replace(' ', '_')}.safetensors"
    save_file(other_kind_file(shapes, kind, seed=7), str(loras / name))
    adapter = load(comfy, name, strength=0.8)
    assert kind in adapter.kinds and len(adapter.module_names) == len(OTHER_KIND_MODULES[kind])
    ours, _, report = apply(comfy, model, adapter)
    reference = stock(comfy, model, clip, name, 0.8)
    changed = set(reference.patches)
    assert set(ours.patches) == changed and max_difference(ours, reference, changed) == 0.0
    assert "not used" not in report
    merged_model, _, merge_report = qr_merge(comfy, model, adapter.replace(strength=1.0))
    at_one = stock(comfy, model, clip, name, 1.0)
    assert set(merged_model.patches) == changed
    assert max_difference(merged_model, at_one, changed, relative=True) <= FLOAT32_PRECISION, merge_report


def test_strength_sweep_merges_other_kinds_as_qr_merge_does(comfy, comfy_base, tiny_sd15, trained):
    import comfy_host

    model, clip, _ = tiny_sd15
    sweep = comfy_host.pack_module(comfy_base, "nodes.strength_sweep")
    adapter = load(comfy, trained["LoHa"])
    cell = sweep.qr_merge_cell_model(model, adapter, adapter, "off")(0.5, 0.5)
    reference = stock(comfy, model, clip, trained["LoHa"], 1.0)
    assert set(cell.patches) == set(reference.patches)
    assert max_difference(cell, reference, set(reference.patches), relative=True) <= FLOAT32_PRECISION
