"""QR Merge cost against ComfyUI's stock two-LoRA patch, plus QR-LoRA factorisation time per layer size.

    .venv/bin/python bench/qr_merge.py

1. Full-size SD1.5 UNet (random weights), two rank-64 adapters on every attention projection:
   stock = LoraLoaderModelOnly x2 + patch_model; ours = Load Adapter x2 + QR Merge + patch_model.
   Target from the issue: ours <= 2x stock.
2. SDXL-shaped attention weights (random tensors of the real shapes, all 560 projections), math only:
   stock = ComfyUI's LoRA weight patch of both adapters (comfy.lora.calculate_weight) per layer;
   ours = the joint-basis merge (core.merge.merge_layer) per layer.
3. qr_factorise (rank 64) per layer size, against the stock patch of one rank-64 LoRA on the same layer.
"""
from __future__ import annotations

import math

import torch
from safetensors.torch import save_file

from harness import comfy_host, full_sd15_unet, median_seconds, record, start_comfy

RANK = 64


def attention_shapes(model) -> dict[str, tuple[int, ...]]:
    suffixes = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items() if ".attn" in k and k.endswith(suffixes)}


def random_lora(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s[0], RANK, generator=g) * 0.01, torch.randn(RANK, s[1], generator=g) / math.sqrt(s[1]))
            for k, s in shapes.items()}


def as_kohya(factors) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, (up, down) in factors.items():
        name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(float(RANK))})
    return tensors


def sd15_nodes(nodes, base, repeats):
    model = full_sd15_unet()
    shapes = attention_shapes(model)
    names = []
    for seed in (1, 2):
        names.append(f"bench_qr_{seed}.safetensors")
        save_file(as_kohya(random_lora(shapes, seed)), str(base / "models" / "loras" / names[-1]))

    def realise(patched):
        patched.patch_model(device_to=torch.device("cpu"))
        patched.unpatch_model(device_to=torch.device("cpu"))

    def stock():
        patched = model
        for name in names:
            patched = nodes["LoraLoaderModelOnly"]().load_lora_model_only(patched, name, 1.0)[0]
        realise(patched)

    def ours():
        content, style = [nodes["CSA_LoadAdapter"].execute(adapter_name=n, strength=1.0, part="whole file",
                                                           role="from file").args[0] for n in names]
        realise(nodes["CSA_QRMerge"].execute(model=model, content=content, style=style, lambda_content=1.0,
                                             lambda_style=1.0, interference="off").args[0])

    t_stock, t_ours = median_seconds(stock, repeats), median_seconds(ours, repeats)
    return len(shapes), t_stock, t_ours


def sdxl_math(base, repeats):
    import comfy.lora
    from build_tiny_models import sdxl_meta_model

    LowRank = comfy_host.pack_module(base, "core.adapter").LowRank
    merge = comfy_host.pack_module(base, "core.merge")
    stock_adapter = comfy_host.pack_module(base, "nodes.comfy_compat").lora_weight_adapter

    shapes = attention_shapes(sdxl_meta_model())
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    loras = [random_lora(shapes, 3), random_lora(shapes, 4)]

    def stock():
        for key, weight in weights.items():
            patches = [(1.0, stock_adapter(key, *lora[key], float(RANK)), 1.0, None, None) for lora in loras]
            comfy.lora.calculate_weight(patches, weight.clone(), key)

    def ours():
        for key, weight in weights.items():
            terms = [merge.Term(LowRank(*lora[key], alpha=float(RANK)), 1.0, role)
                     for lora, role in zip(loras, ("content", "style"))]
            merged = merge.merge_layer(terms).factors
            patch = [(1.0, stock_adapter(key, merged.up, merged.down, None), 1.0, None, None)]
            comfy.lora.calculate_weight(patch, weight.clone(), key)

    return len(shapes), median_seconds(stock, repeats, warmup=0), median_seconds(ours, repeats, warmup=0)


def factorisation_rows(base, repeats):
    import comfy.lora

    qr_factorise = comfy_host.pack_module(base, "core.qr_lora").qr_factorise
    stock_adapter = comfy_host.pack_module(base, "nodes.comfy_compat").lora_weight_adapter

    rows = []
    for shape in ((320, 320), (640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280)):
        weight = torch.randn(shape)
        up, down = torch.randn(shape[0], RANK) * 0.01, torch.randn(RANK, shape[1]) * 0.01
        t_qr = median_seconds(lambda: qr_factorise(weight, RANK), repeats)
        t_patch = median_seconds(lambda: comfy.lora.calculate_weight(
            [(1.0, stock_adapter("k", up, down, None), 1.0, None, None)], weight.clone(), "k"), repeats)
        rows.append((f"qr_factorise {shape[0]}x{shape[1]} rank {RANK}",
                     f"{t_qr * 1000:.1f} ms ({t_qr / t_patch:.0f}x one stock rank-{RANK} patch, {t_patch * 1000:.2f} ms)"))
    return rows


def main():
    nodes, base = start_comfy()
    layers, t_stock, t_ours = sd15_nodes(nodes, base, repeats=3)
    xl_layers, xl_stock, xl_ours = sdxl_math(base, repeats=2)
    rows = [
        (f"SD1.5 full UNet, {layers} attention layers: stock LoraLoader x2 + patch_model", f"{t_stock * 1000:.0f} ms"),
        ("SD1.5: Load Adapter x2 + QR Merge + patch_model", f"{t_ours * 1000:.0f} ms"),
        ("SD1.5 ratio ours / stock (target <= 2)", f"{t_ours / t_stock:.2f}"),
        (f"SDXL shapes, {xl_layers} attention layers: stock patch of two LoRAs", f"{xl_stock * 1000:.0f} ms"),
        ("SDXL shapes: joint-basis merge + patch of the merged LoRA", f"{xl_ours * 1000:.0f} ms"),
        ("SDXL ratio ours / stock", f"{xl_ours / xl_stock:.2f}"),
        *factorisation_rows(base, repeats=3),
    ]
    record(f"QR Merge of two rank-{RANK} adapters", rows,
           notes="Medians in one process. Factorisation is needed only to convert ordinary LoRAs to QR-LoRA form "
                 "(Convert to QR-LoRA), never for merging.")


if __name__ == "__main__":
    main()
