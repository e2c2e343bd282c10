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


def train_and_save(model, clip, algorithm: str, loras_dir: Path, output_dir: Path, steps: int = 2, rank: int = 2,
                   seed: int = 0) -> str:
    """Train with TrainLoraNode, save with SaveLoRA, move the file into ``loras_dir``; returns its file name.

    Conditioning and latents are made under inference mode, as a server runs every node (TrainLoraNode switches it
    off for its own loop). Two latents: the node fails on a single one in 0.3.75 (issue noted in comfyui-notes)."""
    from comfy_extras.nodes_train import SaveLoRA, TrainLoraNode

    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a striped circle"))
        latents = [{"samples": torch.randn(1, 4, 8, 8, generator=generator)} for _ in range(2)]
        trained = TrainLoraNode.execute(
            model=[model], latents=latents, positive=[positive], batch_size=[1], grad_accumulation_steps=[1],
            steps=[steps], learning_rate=[0.01], rank=[rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[seed],
            training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=[algorithm], gradient_checkpointing=[False],
            existing_lora=["[None]"])
        lora, total_steps = trained.args[1], trained.args[3]
        prefix = f"loras/csa_trained_{algorithm.lower()}"
        SaveLoRA.execute(lora=lora, prefix=prefix, steps=total_steps)
    saved = sorted((output_dir / "loras").glob(f"csa_trained_{algorithm.lower()}_{total_steps}_steps_*.safetensors"))
    target = loras_dir / saved[-1].name
    shutil.move(str(saved[-1]), target)
    return target.name
