"""Cost of ConsisLoRA guidance terms: time per step for CFG only, one term and both terms.

    .venv/bin/python bench/consistency_guidance.py [--latent 32] [--steps 4]

Each enabled term adds two conditional UNet passes to CFG's two, so the expected ratios are about
1x, 2x and 3x of CFG (the issue asks for agreement within 15%). Tiny SD1.5 UNet, four adapters on the
B-LoRA blocks, one process.
"""
from __future__ import annotations

import argparse

import torch

from harness import median_seconds, parse_args, record, start_comfy, tiny_sd15

import model_names as names  # scripts/ (on the path through harness)

PROMPTS = {"content_positive": "a {c}", "content_negative": "a {v}",
           "style_positive": "in the style of {v}", "style_negative": "in the style of {c}"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, {"latent": 8, "steps": 1, "repeats": 1})
    nodes, _ = start_comfy()
    import comfy.sample
    import comfy.samplers

    model, clip, _ = tiny_sd15()
    load = nodes["CSA_LoadAdapter"].execute
    adapters = {}
    for image, name in zip(("content", "style"), names.DEMO_BLORA_NAMES):
        for block in ("content", "style"):
            adapters[f"{block}_of_{image}"] = load(adapter_name=name, strength=1.0, part=f"B-LoRA {block} block",
                                                   role=block).args[0]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a sks in the style of zwx"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps)

    def run(lam_c, lam_s):
        guider = nodes["CSA_ContentStyleGuider"].execute(
            model=model, clip=clip, positive=positive, negative=negative, cfg=4.0, lambda_content=lam_c,
            lambda_style=lam_s, content_token="sks", style_token="zwx", **PROMPTS, **adapters).args[0]
        return lambda: guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                                     disable_pbar=True)

    times = {name: median_seconds(run(*lams), args.repeats) / args.steps
             for name, lams in (("cfg", (0, 0)), ("one", (1, 0)), ("both", (1, 1)))}
    record(f"Content-Style Guider cost per step (tiny SD1.5, {args.latent}x{args.latent} latent)", [
        ("CFG only (λ = 0)", f"{times['cfg'] * 1000:.1f} ms"),
        ("one guidance term", f"{times['one'] * 1000:.1f} ms ({times['one'] / times['cfg']:.2f}x, expected 2x)"),
        ("both guidance terms", f"{times['both'] * 1000:.1f} ms ({times['both'] / times['cfg']:.2f}x, expected 3x)"),
    ], notes=f"Median of {args.repeats} runs of {args.steps} Euler steps, batch 1, in one process. CFG batches cond and "
             "uncond into one UNet call; each guidance pass is a separate batch-1 call.")


if __name__ == "__main__":
    main()
