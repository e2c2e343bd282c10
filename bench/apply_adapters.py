"""Apply two rank-64 adapters to every attention projection: the pack's nodes against ComfyUI's LoraLoader.

    .venv/bin/python bench/apply_adapters.py [--model tiny|full]

Two phases, each timed for both paths on the same model in one run:
- node time: stock LoraLoaderModelOnly twice, against Load Adapter twice + Apply Adapters;
- weights: the same plus ModelPatcher.patch_model(), i.e. the patched weights really computed.
"""
from __future__ import annotations

import argparse
import math

import torch
from safetensors.torch import save_file

from harness import full_sd15_unet, median_seconds, parse_args, record, start_comfy, tiny_sd15

RANK = 64


def attention_lora(model, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    suffixes = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    for key, weight in model.model.state_dict().items():
        if ".attn" in key and key.endswith(suffixes):
            name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, weight.shape[1], generator=generator) / math.sqrt(weight.shape[1])
            tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], RANK, generator=generator) * 0.01
            tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "full"], default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, {"model": "tiny", "repeats": 1})
    nodes, base = start_comfy()
    model = tiny_sd15()[0] if args.model == "tiny" else full_sd15_unet()
    names = []
    for seed in (1, 2):
        tensors = attention_lora(model, seed)
        names.append(f"bench_attention_{seed}.safetensors")
        save_file(tensors, str(base / "models" / "loras" / names[-1]))
    layers = len(tensors) // 3

    def stock():
        patched = model
        for name in names:
            patched = nodes["LoraLoaderModelOnly"]().load_lora_model_only(patched, name, 1.0)[0]
        return patched

    def ours():
        adapters = [nodes["CSA_LoadAdapter"].execute(adapter_name=n, strength=1.0, part="whole file",
                                                     role="from file").args[0] for n in names]
        return nodes["CSA_ApplyAdapters"].execute(model=model, adapter=adapters[0], block_strengths="",
                                                  adapter_2=adapters[1]).args[0]

    def realised(make):
        def run():
            patched = make()
            patched.patch_model(device_to=torch.device("cpu"))
            patched.unpatch_model(device_to=torch.device("cpu"))
        return run

    # ComfyUI's LoraLoader caches the last file per node instance; a fresh instance per call reads the file, as ours does.
    stock_nodes = median_seconds(stock, args.repeats)
    our_nodes = median_seconds(ours, args.repeats)
    stock_full = median_seconds(realised(stock), args.repeats)
    our_full = median_seconds(realised(ours), args.repeats)
    record(f"Apply two rank-{RANK} adapters to all {layers} attention projections ({args.model} SD1.5-shaped UNet)", [
        ("stock LoraLoaderModelOnly x2, node time", f"{stock_nodes * 1000:.1f} ms"),
        ("Load Adapter x2 + Apply Adapters, node time", f"{our_nodes * 1000:.1f} ms"),
        ("ratio ours / stock (node time)", f"{our_nodes / stock_nodes:.2f}"),
        ("stock, node time + patch_model", f"{stock_full * 1000:.1f} ms"),
        ("ours, node time + patch_model", f"{our_full * 1000:.1f} ms"),
        ("ratio ours / stock (with weights computed)", f"{our_full / stock_full:.2f}"),
    ], notes=f"Median of {args.repeats} runs after one warm-up, in one process.")


if __name__ == "__main__":
    main()
