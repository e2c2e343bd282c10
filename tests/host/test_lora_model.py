"""ComfyUI's LORA_MODEL socket both ways, against ComfyUI's own nodes: Train LoRA's output into the pack, the pack's
adapters into Load LoRA Model and Save LoRA Weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from support.comfy_trainer import save_with_save_lora, train
from support.lora_files import build_file
from support.weights import patched_weights

pytestmark = pytest.mark.host

FLOAT32_PRECISION = 1e-6  # of a layer's largest weight: a few float32 ulps
KOHYA_MODULES = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.1.proj_in",
                 "output_blocks.0.0.in_layers.2"]  # a linear, a 1x1 conv, a 3x3 conv


@pytest.fixture(scope="module")
def shapes(tiny_sd15):
    return {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}


def stock_loader(comfy, model, lora, strength):
    """Load LoRA Model with weight patches (newer releases add a bypass input, off by default: kept off here)."""
    import inspect

    from comfy_extras.nodes_train import LoraModelLoader

    bypass = {"bypass": False} if "bypass" in inspect.signature(LoraModelLoader.execute).parameters else {}
    return LoraModelLoader.execute(model=model, lora=lora, strength_model=strength, **bypass).args[0]


def ours_applied(comfy, model, adapter):
    return comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args[0]


def relative_difference(ours, theirs, keys) -> float:
    a, b = patched_weights(ours, keys), patched_weights(theirs, keys)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in keys)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa"])
def test_train_lora_output_applies_like_load_lora_model(comfy, tiny_sd15, algorithm):
    model, clip, _ = tiny_sd15
    lora, _ = train(model, clip, algorithm)
    adapter = comfy["CSA_AdapterFromLoraModel"].execute(lora=lora, strength=0.7, role="content").args[0]
    assert adapter.role == "content" and adapter.source == "LORA_MODEL" and not adapter.ignored_keys
    ours, theirs = ours_applied(comfy, model, adapter), stock_loader(comfy, model, lora, 0.7)
    changed = set(theirs.patches)
    assert any(k.endswith(".bias") for k in changed), "Train LoRA's bias diffs are part of the check"
    assert set(ours.patches) == changed, "every weight and bias the stock loader changes, nothing else"
    assert relative_difference(ours, theirs, changed) < FLOAT32_PRECISION


def test_pack_adapter_as_lora_model_loads_in_stock_nodes_and_round_trips(comfy, comfy_base, tiny_sd15, shapes):
    """A kohya file (module names the model's key map must translate) -> ADAPTER -> LORA_MODEL: Load LoRA Model
    applies it as Apply Adapters does; Save LoRA Weights writes it, and Load Adapter reads back the same factors."""
    model, _, _ = tiny_sd15
    loras = comfy_base / "models" / "loras"
    tensors, deltas = build_file(shapes, KOHYA_MODULES, "kohya", rank=3, alpha=1.5, seed=5)
    save_file(tensors, str(loras / "csa_lora_model_kohya.safetensors"))
    adapter = comfy["CSA_LoadAdapter"].execute(adapter_name="csa_lora_model_kohya.safetensors", strength=1.0,
                                               part="whole file", role="style").args[0]
    with pytest.raises(ValueError, match="not in comfy form; connect the model"):
        comfy["CSA_AdapterToLoraModel"].execute(adapter=adapter)
    lora = comfy["CSA_AdapterToLoraModel"].execute(adapter=adapter, model=model).args[0]
    assert sorted(lora) == sorted(f"diffusion_model.{m}.{part}" for m in KOHYA_MODULES
                                  for part in ("lora_up.weight", "lora_down.weight", "alpha"))

    theirs, ours = stock_loader(comfy, model, lora, 0.8), ours_applied(comfy, model, adapter.replace(strength=0.8))
    assert set(theirs.patches) == set(ours.patches) == set(deltas)
    assert relative_difference(ours, theirs, set(deltas)) < FLOAT32_PRECISION

    name = save_with_save_lora(lora, "loras/csa_from_lora_model", 7, loras, comfy_base / "output")
    written = load_file(str(loras / name))
    assert written.keys() == lora.keys() and all(torch.equal(written[k], lora[k]) for k in lora)
    back = comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=1.0, part="whole file", role="style").args[0]
    for native in KOHYA_MODULES:
        original, read = adapter.modules["lora_unet_" + native.replace(".", "_")], back.modules["diffusion_model." + native]
        assert torch.equal(read.up, original.up) and torch.equal(read.down, original.down)
        assert read.alpha == original.alpha == 1.5


def test_a_lora_model_with_nan_is_refused_by_key(comfy, tiny_sd15):
    key = "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight"
    lora = {key: torch.full((320, 2, 1, 1), float("nan")),
            "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1)}
    with pytest.raises(ValueError, match=f"LORA_MODEL: tensor '{key}' contains NaN"):
        comfy["CSA_AdapterFromLoraModel"].execute(lora=lora, strength=1.0, role="from file")


def test_an_empty_lora_model_is_refused(comfy):
    with pytest.raises(ValueError, match="LORA_MODEL: no adapter tensors found"):
        comfy["CSA_AdapterFromLoraModel"].execute(lora={}, strength=1.0, role="from file")
