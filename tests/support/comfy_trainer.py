"""Adapter files made the way a ComfyUI user makes them: ComfyUI's own TrainLoraNode, saved by its SaveLoRA node.

Tiny and fast (a couple of steps at rank 2 on two 8x8 latents), but real: every algorithm the node offers, with the
bias and norm diffs it trains beside the adapter's own factors.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")  # what TrainLoraNode offers in ComfyUI 0.3.75 (a test checks the list)


def offered_algorithms() -> list[str]:
    import comfy.weight_adapter

    return list(comfy.weight_adapter.adapter_maps)


def train(model, clip, algorithm: str, steps: int = 2, rank: int = 2, seed: int = 0) -> tuple[dict, int]:
    """(LORA_MODEL, steps trained) from TrainLoraNode, as its lora and steps outputs hand them to the next node.

    Conditioning and latents are made under inference mode, as a server runs every node (TrainLoraNode switches it
    off for its own loop). Two latents: the node fails on a single one in 0.3.75 (issue noted in comfyui-notes).
    Inputs this call does not set take the node's own defaults and outputs are picked by type, so newer releases'
    extra inputs (bucket_mode, bypass_mode, ...) and their dropped MODEL output change nothing here."""
    from comfy_extras.nodes_train import TrainLoraNode

    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a striped circle"))
        latents = [{"samples": torch.randn(1, 4, 8, 8, generator=generator)} for _ in range(2)]
        given = {"model": model, "latents": latents, "positive": positive, "batch_size": 1,
                 "grad_accumulation_steps": 1, "steps": steps, "learning_rate": 0.01, "rank": rank, "optimizer": "AdamW",
                 "loss_function": "MSE", "seed": seed, "training_dtype": "fp32", "lora_dtype": "fp32",
                 "algorithm": algorithm, "gradient_checkpointing": False, "existing_lora": "[None]"}
        schema = TrainLoraNode.define_schema()
        inputs = {spec.id: given[spec.id] if spec.id in given else spec.default for spec in schema.inputs}
        # is_input_list: every input arrives as a list (latents already is one, one entry per latent)
        trained = TrainLoraNode.execute(**{k: v if k == "latents" else [v] for k, v in inputs.items()})
    types = [output.io_type for output in schema.outputs]
    return trained.args[types.index("LORA_MODEL")], trained.args[types.index("INT")]


def train_and_save(model, clip, algorithm: str, loras_dir: Path, output_dir: Path, steps: int = 2, rank: int = 2,
                   seed: int = 0) -> str:
    """Train with TrainLoraNode, save with SaveLoRA, move the file into ``loras_dir``; returns its file name."""
    lora, total_steps = train(model, clip, algorithm, steps, rank, seed)
    prefix = f"loras/csa_trained_{algorithm.lower()}"
    return save_with_save_lora(lora, prefix, total_steps, loras_dir, output_dir)


def save_with_save_lora(lora: dict, prefix: str, steps: int, loras_dir: Path, output_dir: Path) -> str:
    """ComfyUI's SaveLoRA node writes ``lora`` under output/<prefix>; the file is moved into ``loras_dir`` (returns
    its name)."""
    from comfy_extras.nodes_train import SaveLoRA

    with torch.inference_mode():
        SaveLoRA.execute(lora=lora, prefix=prefix, steps=steps)
    folder, stem = (output_dir / prefix).parent, Path(prefix).name
    saved = sorted(folder.glob(f"{stem}_{steps}_steps_*.safetensors"))
    target = loras_dir / saved[-1].name
    shutil.move(str(saved[-1]), target)
    return target.name
