"""QR Merge cost against ComfyUI's stock two-LoRA patch, plus QR-LoRA factorisation time per layer size.

    .venv/bin/python bench/qr_merge.py            # full sizes (a few minutes), appends to bench/RESULTS.md
    .venv/bin/python bench/qr_merge.py --smoke    # every code path at tiny sizes in seconds, prints only

1. SD1.5 UNet (full size, random weights), two rank-64 adapters on every attention projection:
   stock = LoraLoaderModelOnly x2 + patch_model; ours = Load Adapter x2 + QR Merge + patch_model, in the
   default concatenated form, with interference removal, and in the compact joint-basis form.
2. SDXL-shaped attention weights (random tensors of the real shapes, all 560 projections), math only:
   stock = ComfyUI's LoRA weight patch of both adapters (comfy.lora.calculate_weight) per layer;
   ours = core.merge.merge_layers over all layers + the patch of the merged LoRA (overlap report off, as QR
   Merge's default; with it in one or both spaces measured too).
3. qr_factorise (rank 64, randomized SVD, fit error included) per layer size, against the stock patch of one
   rank-64 LoRA on the same layer; W's rank-64 fit error next to the exact top-64 error (full SVD).

Targets from #21: 1 and 2 at most 1.0x stock without interference removal; 3 at most 10x on every size.
The timed functions run in turn within each round, so load from other processes hits stock and ours alike.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
from safetensors.torch import save_file

from harness import REPO_ROOT, comfy_host, full_sd15_unet, median_seconds, record, start_comfy, tiny_sd15

RANK = 64
REMOVAL = "style without content directions"
OVERLAP_OUTPUT, OVERLAP_BOTH = "output spaces", "output and input spaces"  # QR Merge's overlap_report options
FACTORISATION_SHAPES = ((320, 320), (640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280))
SMOKE = {"rank": 8, "sdxl_layers": 6, "factorisation_shapes": ((96, 96), (64, 160)), "repeats": 1}
FULL = {"rank": RANK, "sdxl_layers": None, "factorisation_shapes": FACTORISATION_SHAPES, "repeats": 5}


def alternating_medians(functions: dict, repeats: int, calls: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn within each round (after one warm-up each)."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(median_seconds(lambda: [function() for _ in range(calls)], 1, warmup=0) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def attention_shapes(model) -> dict[str, tuple[int, ...]]:
    suffixes = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items() if ".attn" in k and k.endswith(suffixes)}


def random_lora(shapes, seed, rank):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s[0], rank, generator=g) * 0.01, torch.randn(rank, s[1], generator=g) / math.sqrt(s[1]))
            for k, s in shapes.items()}


def as_kohya(factors, rank) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, (up, down) in factors.items():
        name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(float(rank))})
    return tensors


def sd15_rows(nodes, base, model, rank, repeats) -> list[tuple[str, str]]:
    shapes = attention_shapes(model)
    names = []
    for seed in (1, 2):
        names.append(f"bench_qr_{seed}.safetensors")
        save_file(as_kohya(random_lora(shapes, seed, rank), rank), str(base / "models" / "loras" / names[-1]))
    cpu = torch.device("cpu")

    def stock_model():
        patched = model
        for name in names:
            patched = nodes["LoraLoaderModelOnly"]().load_lora_model_only(patched, name, 1.0)[0]
        return patched

    def merged_model(interference="off", **options):
        content, style = [nodes["CSA_LoadAdapter"].execute(adapter_name=n, strength=1.0, part="whole file",
                                                           role="from file").args[0] for n in names]
        return nodes["CSA_QRMerge"].execute(model=model, content=content, style=style, lambda_content=1.0,
                                            lambda_style=1.0, interference=interference, **options).args[0]

    def realise(patched):
        patched.patch_model(device_to=cpu)
        patched.unpatch_model(device_to=cpu)

    merge = comfy_host.pack_module(base, "core.merge")
    adapters = [nodes["CSA_LoadAdapter"].execute(adapter_name=n, strength=1.0, part="whole file",
                                                 role="from file").args[0] for n in names]
    binding = comfy_host.pack_module(base, "nodes.model_binding")
    terms, _ = binding.weighted_terms([binding.merge_input(adapters[0], model, "content"),
                                       binding.merge_input(adapters[1], model, "style")],
                                      {"content": 1.0, "style": 1.0})
    t = alternating_medians({
        "stock": lambda: realise(stock_model()),
        "ours": lambda: realise(merged_model()),
        "output": lambda: realise(merged_model(overlap_report=OVERLAP_OUTPUT)),
        "both": lambda: realise(merged_model(overlap_report=OVERLAP_BOTH)),
        "removal": lambda: realise(merged_model(REMOVAL)),
        "compact": lambda: realise(merged_model(merged_form="joint orthonormal basis (compact)")),
        "overlap": lambda: merge.layer_overlaps(terms, torch.float32),
    }, repeats)
    difference = max_weight_difference(stock_model(), merged_model(), shapes)
    return [
        (f"SD1.5 UNet, {len(shapes)} attention layers: stock LoraLoader x2 + patch_model", f"{t['stock'] * 1000:.0f} ms"),
        ("SD1.5: Load Adapter x2 + QR Merge (concatenated, defaults) + patch_model", f"{t['ours'] * 1000:.0f} ms"),
        ("**SD1.5 ratio ours / stock (target <= 1.0)**, QR Merge's defaults (overlap report off)",
         f"**{t['ours'] / t['stock']:.2f}**"),
        ("SD1.5 ratio with the overlap report in the output spaces", f"{t['output'] / t['stock']:.2f}"),
        ("SD1.5 ratio with the overlap report in the output and input spaces", f"{t['both'] / t['stock']:.2f}"),
        ("SD1.5 ratio with interference removal (joint basis)", f"{t['removal'] / t['stock']:.2f}"),
        ("SD1.5 ratio, compact joint-basis form", f"{t['compact'] / t['stock']:.2f}"),
        ("SD1.5: the overlap report in both spaces alone (core.merge.layer_overlaps)",
         f"{t['overlap'] * 1000:.0f} ms = {t['overlap'] / t['stock']:.2f} of stock"),
        ("SD1.5: max abs difference of patched weights, ours vs stock", f"{difference:.1e}"),
    ]


def max_weight_difference(stock, ours, shapes) -> float:
    """The largest |ours - stock| over the patched attention weights (both realised through patch_model)."""
    cpu = torch.device("cpu")
    stock.patch_model(device_to=cpu)
    try:
        reference = {k: v.clone() for k, v in stock.model.state_dict().items() if k in shapes}
    finally:
        stock.unpatch_model(device_to=cpu)
    ours.patch_model(device_to=cpu)
    try:
        state = ours.model.state_dict()
        return max(float((state[k] - v).abs().max()) for k, v in reference.items())
    finally:
        ours.unpatch_model(device_to=cpu)


def stock_adapter(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float | None):
    """ComfyUI's own LoRA weight adapter, as its LoRA loader builds it (the pack's patches use a subclass)."""
    import comfy.weight_adapter

    return comfy.weight_adapter.LoRAAdapter.load(name, {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down},
                                                 alpha, None)


def sdxl_rows(base, rank, repeats, layers) -> list[tuple[str, str]]:
    import comfy.lora
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from support.models import sdxl_meta_model

    LowRank = comfy_host.pack_module(base, "core.adapter").LowRank
    merge = comfy_host.pack_module(base, "core.merge")
    pack_adapter = comfy_host.pack_module(base, "nodes.comfy_compat").lora_weight_adapter

    shapes = dict(list(attention_shapes(sdxl_meta_model()).items())[:layers])
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    loras = [random_lora(shapes, 3, rank), random_lora(shapes, 4, rank)]

    def stock():
        for key, weight in weights.items():
            patches = [(1.0, stock_adapter(key, *lora[key], float(rank)), 1.0, None, None) for lora in loras]
            comfy.lora.calculate_weight(patches, weight.clone(), key)

    def ours(interference="off", overlap=merge.OVERLAP_OFF):
        terms = {key: [merge.Term(LowRank(*lora[key], alpha=float(rank)), 1.0, role)
                       for lora, role in zip(loras, ("content", "style"))] for key in weights}
        merged = merge.merge_layers(terms, interference, overlap=overlap)
        for key, weight in weights.items():
            factors = merged[key].factors
            patch = [(1.0, pack_adapter(key, factors.up, factors.down, None), 1.0, None, None)]
            comfy.lora.calculate_weight(patch, weight.clone(), key)

    overlap_terms = {key: [merge.Term(LowRank(*lora[key], alpha=float(rank)), 1.0, role)
                           for lora, role in zip(loras, ("content", "style"))] for key in weights}
    t = alternating_medians({"stock": stock, "ours": ours, "removal": lambda: ours(REMOVAL),
                             "output": lambda: ours(overlap=merge.OVERLAP_OUTPUT),
                             "both": lambda: ours(overlap=merge.OVERLAP_BOTH),
                             "overlap": lambda: merge.layer_overlaps(overlap_terms, torch.float32)}, repeats)
    return [
        (f"SDXL shapes, {len(shapes)} attention layers: stock patch of two LoRAs", f"{t['stock'] * 1000:.0f} ms"),
        ("SDXL shapes: merge_layers (concatenated, no overlap report) + patch of the merged LoRA",
         f"{t['ours'] * 1000:.0f} ms"),
        ("**SDXL ratio ours / stock (target <= 1.0)**, QR Merge's defaults (overlap report off)",
         f"**{t['ours'] / t['stock']:.2f}**"),
        ("SDXL ratio with the overlap report in the output spaces", f"{t['output'] / t['stock']:.2f}"),
        ("SDXL ratio with the overlap report in the output and input spaces", f"{t['both'] / t['stock']:.2f}"),
        ("SDXL ratio with interference removal (joint basis)", f"{t['removal'] / t['stock']:.2f}"),
        ("SDXL: the overlap report in both spaces alone (core.merge.layer_overlaps)",
         f"{t['overlap'] * 1000:.0f} ms = {t['overlap'] / t['stock']:.2f} of stock"),
    ]


def exact_top_r_error(weight: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(weight.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def factorisation_rows(base, shapes, rank, repeats) -> list[tuple[str, str]]:
    import comfy.lora

    qr_factorise = comfy_host.pack_module(base, "core.qr_lora").qr_factorise

    rows = []
    g = torch.Generator().manual_seed(5)
    for shape in shapes:
        weight = torch.randn(shape, generator=g)
        adapter = stock_adapter("k", torch.randn(shape[0], rank, generator=g) * 0.01,
                                torch.randn(rank, shape[1], generator=g) * 0.01, None)
        t = alternating_medians({
            "qr": lambda: qr_factorise(weight, rank),
            "patch": lambda: comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weight.clone(), "k"),
        }, repeats * 3, calls=max(1, 4_000_000 // (shape[0] * shape[1])))
        t_exact = median_seconds(lambda: qr_factorise(weight, rank, svd="exact"), 1, warmup=0)
        fit, exact = qr_factorise(weight, rank).fit_error, exact_top_r_error(weight, rank)
        rows.append((f"**qr_factorise {shape[0]}x{shape[1]} rank {rank}** (target <= 10x)",
                     f"{t['qr'] * 1000:.2f} ms = **{t['qr'] / t['patch']:.1f}x** one stock rank-{rank} patch "
                     f"({t['patch'] * 1000:.2f} ms; full SVD {t_exact * 1000:.0f} ms = {t_exact / t['patch']:.0f}x); "
                     f"fit error {fit:.4f} vs exact top-{rank} {exact:.4f} (+{fit / exact - 1:.1%})"))
    size = shapes[-1][1]  # a spectrum like a trained weight's, σ_i ∝ 1/i, on the last size's square
    u, _ = torch.linalg.qr(torch.randn(size, size, generator=g))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=g))
    decaying = (u / torch.arange(1, size + 1)) @ v.T
    fit, exact = qr_factorise(decaying, rank).fit_error, exact_top_r_error(decaying, rank)
    rows.append((f"fit error, {size}x{size} weight with σ_i ∝ 1/i, rank {rank}",
                 f"{fit:.4f} vs exact top-{rank} {exact:.4f} (+{fit / exact - 1:.1%})"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every code path at tiny sizes (tiny SD1.5, a few SDXL layers); prints, records nothing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own; --smoke: 1); recorded with the machine")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    # one thread for smoke runs: under other processes' load, two-thread parallel regions stall on each other
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    nodes, base = start_comfy()
    model = tiny_sd15()[0] if args.smoke else full_sd15_unet()
    rows = []
    for section, run in (("SD1.5", lambda: sd15_rows(nodes, base, model, sizes["rank"], sizes["repeats"])),
                         ("SDXL", lambda: sdxl_rows(base, sizes["rank"], sizes["repeats"], sizes["sdxl_layers"])),
                         ("factorisation", lambda: factorisation_rows(base, sizes["factorisation_shapes"],
                                                                      sizes["rank"], sizes["repeats"]))):
        rows += run()
        print(f"{section} done: " + "; ".join(f"{name}: {value}" for name, value in rows), file=sys.stderr, flush=True)
    record(f"QR Merge of two rank-{sizes['rank']} adapters{' (smoke: tiny sizes)' if args.smoke else ''}", rows,
           notes="Medians of alternating runs in one process; ratios are ours / stock in the same run. Load average "
                 f"(other processes on this machine) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
                 f"end. Randomized SVD: fixed-seed rank-{sizes['rank']} sketch, two power iterations; factorisation is "
                 "needed only to convert ordinary LoRAs to QR-LoRA form (Convert to QR-LoRA), never for merging.",
           append=not args.smoke)


if __name__ == "__main__":
    main()
