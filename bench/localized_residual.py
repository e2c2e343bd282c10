"""Sampling cost of attention-localized residuals (LAG) against the same model without them.

    .venv/bin/python bench/localized_residual.py [--latent 32] [--steps 6]

Three runs of KSampler (Euler, CFG 4, batch 1) on the same model in one process, time per step:
base model; residual applied globally as a weight patch (Apply Adapters); residual with LAG (Apply
Localized Residual). Target from the issue: LAG under 15% over the base model.
"""
from __future__ import annotations

import argparse

import torch

from harness import median_seconds, parse_args, record, start_comfy, tiny_sd15


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px images)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, {"latent": 8, "steps": 1, "repeats": 1})
    nodes, _ = start_comfy()
    import nodes as comfy_nodes

    model, clip, _ = tiny_sd15()
    residual = nodes["CSA_NewResidualAdapter"].execute(model=model, rank_fraction=0.05, init_scale=0.5, seed=1).args[0]
    prompt = "a photo of sks dog on the beach"
    lag_model, positive = nodes["CSA_ApplyLocalizedResidual"].execute(
        model=model, residual=residual, clip=clip, prompt=prompt, concept_words="sks dog", lag=True,
        threshold_mode="median", threshold=0.5, start_percent=0.0, end_percent=1.0, strength=1.0).args
    global_model = nodes["CSA_ApplyAdapters"].execute(model=model, adapter=residual, block_strengths="").args[0]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, args.latent, args.latent)}

    def run(m):
        return lambda: comfy_nodes.common_ksampler(m, 1, args.steps, 4.0, "euler", "normal", positive, negative, latent)

    per_step = {name: median_seconds(run(m), args.repeats) / args.steps
                for name, m in (("base", model), ("global", global_model), ("lag", lag_model))}
    record(f"Localized residual sampling cost (tiny SD1.5 UNet, {args.latent}x{args.latent} latent, CFG)", [
        ("base model, per step", f"{per_step['base'] * 1000:.1f} ms"),
        ("residual applied globally (weight patch), per step", f"{per_step['global'] * 1000:.1f} ms"),
        ("LAG (mask from concept attention), per step", f"{per_step['lag'] * 1000:.1f} ms"),
        ("LAG overhead over base (target < 15%)", f"{(per_step['lag'] / per_step['base'] - 1) * 100:.1f}%"),
        ("LAG over global residual", f"{(per_step['lag'] / per_step['global'] - 1) * 100:.1f}%"),
    ], notes=f"{args.steps} Euler steps, median of {args.repeats} runs, one process. The tiny UNet has 4 transformer "
             "blocks, so attention is a larger share of its cost than of a full SD1.5 UNet's.")


if __name__ == "__main__":
    main()
