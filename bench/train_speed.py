"""Training speed and memory: Train Adapter (LoRA) against ComfyUI's TrainLoraNode on the world model and on a
FLUX-shaped model (FLUX_TRAINERS).

    .venv/bin/python bench/train_speed.py [--steps 30] [--batch 4] [--rank 8]

Same model (world_sd15), rank, batch, resolution (64 px, 8x8 latents), x0 loss (TrainLoraNode's), AdamW, fp32.
TrainLoraNode adapts every weight of the UNet (LoRA on every matrix and conv, a diff on every bias and norm);
Train Adapter is measured on the attention projections (its usual target) and on every linear layer (the
nearest to equal modules: it never adapts 3x3 convs, norms or biases). Each trainer runs in a fresh child
process under torch.inference_mode(), as inside a server: steps per second is the marginal rate between a
short and a long run in that process (set-up excluded); peak memory is the highest resident memory sampled
during the first (short) run minus the resident memory just before it (model loaded, images encoded). TrainLoraNode gets two latents (in 0.3.75 one
latent input fails: multi_res unbound) and conditioning made without gradients.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "world")]
import harness  # noqa: E402
from harness import comfy_host, parse_args, record  # noqa: E402
from model_names import WORLD_CHECKPOINT_NAME  # noqa: E402

TRAINERS = {
    "ours, attention projections": "attention projections",
    "ours, all linear layers": "all linear",
    "ours, Train B4M Content (PLP + MCP, attention projections)": "b4m",
    "ours, Train Personalized Residual (proj_out, 5%)": "residual",
    "ours, Train Personalized Residual + V*'s token embedding (one caption)": "residual+token",
    "TrainLoraNode (every layer)": None,
}
# FLUX-shaped rows: the tiny FLUX.1-dev (hidden 3072, one double + one single block, 546M parameters; what ComfyUI
# detects as FLUX) on 16x16 latents (64 image tokens) with conditioning given directly (8 T5-sized tokens), flow
# matching; the pack's LoRA on the attention projections (fused qkv / linear1 / linear2 whole) against TrainLoraNode.
# TrainLoraNode (0.3.75) trains FLUX only with its gradient checkpointing on (without it, the double block's in-place
# `img +=` breaks its backward pass: "modified by an inplace operation") and only on a model loaded outside inference
# mode (UNETLoader in a server runs under inference mode; QK-norm's scale, which it does not adapt, stays an inference
# tensor that autograd cannot save). So these rows load FLUX outside inference mode, TrainLoraNode checkpointed; the
# FLUX_AS_SERVED rows load it as a server does and report whether each trainer trains at all.
FLUX_TRAINERS = {
    "FLUX: ours, attention projections": "flux:attention projections",
    "FLUX: ours, attention projections, gradient checkpointing": "flux:attention projections+checkpointing",
    "FLUX: TrainLoraNode (every layer, gradient checkpointing)": "flux:stock",
}
FLUX_AS_SERVED = {"FLUX: TrainLoraNode, model loaded as a server loads it (inference mode)": "flux:stock-served",
                  "FLUX: ours, model loaded as a server loads it (inference mode)": "flux:attention projections-served"}


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Highest resident memory above the level at entry, sampled every 2 ms by a thread."""

    def __enter__(self):
        self.base = self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def world_inputs(batch: int):
    """The world model, `batch` training images (world generator, 64 px) with captions, their latents and conds."""
    import numpy as np
    import torch

    import comfy.sd
    from world import BASE_SHAPES, BASE_STYLES, render

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(comfy_host.TINY_MODELS_DIR / WORLD_CHECKPOINT_NAME))
    samples = [render(BASE_SHAPES[i % 6], BASE_STYLES[i % 5], 300 + i) for i in range(batch)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).float() / 255
    return model, clip, vae, images, [s.caption for s in samples]


def flux_inputs(batch: int):
    """The tiny FLUX model, ``batch`` (at least two: TrainLoraNode's one-latent case fails in 0.3.75) random 16x16
    FLUX latents and their conditioning, given directly (no small T5)."""
    import torch

    import comfy.sd
    from tiny_dit_models import tiny_flux_path

    model = comfy.sd.load_diffusion_model(str(tiny_flux_path()))
    generator = torch.Generator().manual_seed(0)
    count = max(batch, 2)
    latents = torch.randn(count, 16, 16, 16, generator=generator) * 0.5
    conds = [[[torch.randn(1, 8, 4096, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator),
                                                             "guidance": 3.5}]] for _ in range(count)]
    return model, latents, conds


def run_flux(nodes, model, latents, conds, steps: int, args) -> None:
    """One FLUX run: the pack's Train Adapter from Training Latents, or TrainLoraNode on the same latents and
    conditioning; rank, batch, lr, AdamW, fp32 as the world rows, each trainer's flow-matching velocity loss."""
    if args.targets.startswith("flux:stock"):
        from comfy_extras.nodes_train import TrainLoraNode

        TrainLoraNode.execute(
            model=[model], latents=[{"samples": latents[i:i + 1]} for i in range(len(conds))],
            positive=[c for c in conds], batch_size=[args.batch], steps=[steps], grad_accumulation_steps=[1],
            learning_rate=[1e-4], rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
            training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[True],  # see FLUX_TRAINERS
            existing_lora=["[None]"])
        return
    data = nodes["CSA_TrainingLatents"].execute(latents={"samples": latents}, conditioning=[c[0] for c in conds],
                                                captions="", repeats=1, trigger_word="").args[0]
    options = nodes["CSA_TrainingOptions"].execute(
        batch_size=args.batch, accumulation=1, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=0.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision="fp32", gradient_checkpointing=args.targets.endswith("+checkpointing")).args[0]
    targets = args.targets[5:].removesuffix("-served").removesuffix("+checkpointing")
    nodes["CSA_TrainAdapter"].execute(model=model, data=data, targets=targets, blocks="",
                                      rank=args.rank, alpha=float(args.rank), steps=steps, lr=1e-4, loss="v",
                                      role="generic", seed=0, filename="", overwrite=False, resume_from="none",
                                      options=options)


def run_ours(nodes, model, clip, vae, images, captions, steps: int, args) -> None:
    data = nodes["CSA_TrainingImages"].execute(images=images, captions="\n".join(captions), image_folder="", repeats=1,
                                               trigger_word="", resolution=64).args[0]
    options = nodes["CSA_TrainingOptions"].execute(
        batch_size=args.batch, accumulation=1, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=0.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision="fp32").args[0]
    if args.targets == "b4m":  # the auxiliary set: the same pictures (MCP doubles the batch per model call)
        nodes["CSA_TrainB4MContent"].execute(model=model, clip=clip, vae=vae, data=data, auxiliary_data=data,
                                             targets="attention projections", blocks="", rank=args.rank, steps=steps,
                                             lr=1e-4, lr_auxiliary=1e-5, orthogonal_init=True, loss="x0", seed=0,
                                             filename="", overwrite=False, resume_from="none", options=options)
        return
    if args.targets.startswith("residual"):  # with the token: the paper's one caption, encoded at every step
        token = args.targets == "residual+token"
        nodes["CSA_TrainPersonalizedResidual"].execute(
            model=model, clip=clip, vae=vae, data=data, identifier="sks", class_word="shape",
            caption="a photo of a {identifier} {class_word}" if token else "", rank_fraction=0.05, steps=steps,
            lr=1e-3, loss="x0", seed=0, filename="", overwrite=False, resume_from="none", options=options,
            learn_token_embedding=token)
        return
    nodes["CSA_TrainAdapter"].execute(model=model, clip=clip, vae=vae, data=data, targets=args.targets, blocks="",
                                      rank=args.rank, alpha=float(args.rank), steps=steps, lr=1e-4, loss="x0",
                                      role="generic", seed=0, filename="", overwrite=False, resume_from="none",
                                      options=options)


def run_stock(nodes, model, clip, vae, images, captions, steps: int, args) -> None:
    from comfy_extras.nodes_train import TrainLoraNode

    latents = vae.encode(images)
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in captions]  # made without gradients
    TrainLoraNode.execute(
        model=[model], latents=[{"samples": latents[i:i + 1]} for i in range(len(captions))],
        positive=conds, batch_size=[args.batch], steps=[steps],
        grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[args.rank], optimizer=["AdamW"],
        loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"], algorithm=["LoRA"],
        gradient_checkpointing=[False], existing_lora=["[None]"])


def child(args) -> None:
    """One trainer in this process: a short warm-up run, then the timed long run; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    nodes, _ = harness.start_comfy()
    with torch.inference_mode():  # as inside a server: models and conditioning are inference tensors
        flux = args.targets.startswith("flux:")
        if flux:  # the rows to compare load FLUX outside inference mode (see FLUX_TRAINERS)
            with torch.inference_mode(args.targets.endswith("-served")):
                inputs = flux_inputs(args.batch)
        else:
            inputs = world_inputs(args.batch)
        run = run_flux if flux else run_stock if args.targets == "stock" else run_ours
        if args.targets.endswith("-served"):  # does it train at all? the error it gives, or that it ran
            try:
                run(nodes, *inputs, args.short, args)
            except RuntimeError as error:
                print("RESULT " + json.dumps({"error": str(error).splitlines()[0]}))
                return
            print("RESULT " + json.dumps({"error": None}))
            return
        with PeakMemory() as memory:  # the first run in a fresh process: every allocation training makes
            started = time.perf_counter()
            run(nodes, *inputs, args.short, args)
            short = time.perf_counter() - started
        started = time.perf_counter()
        run(nodes, *inputs, args.steps, args)
        long = time.perf_counter() - started
    print("RESULT " + json.dumps({"steps_per_second": (args.steps - args.short) / (long - short),
                                  "peak_mib": memory.extra_mib, "long_seconds": long, "short_seconds": short}))


def measure(name: str, targets: str | None, args) -> dict:
    flux = (targets or "").startswith("flux:")
    steps, short, batch = (args.flux_steps, args.flux_short, args.flux_batch) if flux else (args.steps, args.short,
                                                                                         args.batch)
    command = [sys.executable, __file__, "--child", "--targets", targets or "stock", "--steps", str(steps),
               "--short", str(short), "--batch", str(batch), "--rank", str(args.rank), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=tempfile.gettempdir())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of the timed run")
    parser.add_argument("--short", type=int, default=5, help="steps of the warm-up run (subtracted)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flux-steps", type=int, default=8, help="FLUX rows: steps of the timed run")
    parser.add_argument("--flux-short", type=int, default=2, help="FLUX rows: steps of the warm-up run")
    parser.add_argument("--flux-batch", type=int, default=2, help="FLUX rows: batch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="attention projections", help=argparse.SUPPRESS)
    args = parse_args(parser, {"steps": 3, "short": 1, "batch": 2, "rank": 2, "flux_steps": 2, "flux_short": 1,
                               "flux_batch": 1})
    if args.child:
        return child(args)
    results = {name: measure(name, targets, args) for name, targets in {**TRAINERS, **FLUX_TRAINERS}.items()}
    rows = []
    for name, targets in FLUX_AS_SERVED.items():
        error = measure(name, targets, args)["error"]
        rows.append((name, f"fails: {error}" if error else "trains"))
    for name, result in results.items():
        rows.append((f"{name}: steps per second", f"{result['steps_per_second']:.3f}"))
        rows.append((f"{name}: peak extra memory", f"{result['peak_mib']:.0f} MiB"))
    for trainers, target in ((TRAINERS, "speed target >= 1.5"), (FLUX_TRAINERS, "speed target >= 1")):
        *ours, stock = list(trainers)
        for name in ours:
            speed = results[name]["steps_per_second"] / results[stock]["steps_per_second"]
            memory = results[name]["peak_mib"] / max(results[stock]["peak_mib"], 1e-9)
            rows.append((f"{name} / {stock}", f"speed x{speed:.2f} ({target}), memory x{memory:.2f} (target <= 0.7)"))
    record(f"Training speed: the pack's trainers vs TrainLoraNode (world model, rank {args.rank}, batch {args.batch}, 64 px)",
           rows, notes=f"Each trainer in a fresh process under inference mode, {args.threads} torch thread(s); steps "
                       f"per second from a {args.steps}-step run minus a {args.short}-step run; memory: resident "
                       f"memory sampled every 2 ms during the first run above the level before it. x0 loss, AdamW, fp32 for all. "
                       f"B4M's step predicts the main and the auxiliary batch (the same pictures here) in one call. "
                       f"FLUX rows: the tiny FLUX.1-dev (546M parameters), batch {args.flux_batch}, 16x16 latents, "
                       f"conditioning given directly, {args.flux_steps}-step run minus {args.flux_short}; each "
                       f"trainer's velocity loss (flow matching). "
                       f"Load average at the start: {os.getloadavg()[0]:.1f} (the machine is shared).")


if __name__ == "__main__":
    main()
