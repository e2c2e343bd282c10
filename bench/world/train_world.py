"""Train the miniature world's base model on the CPU: a TAESD-shaped VAE, then a tiny SD1.5-shaped UNet.

    .venv/bin/python bench/world/train_world.py [--vae-steps 900] [--unet-steps 2000] [--vae-only | --reuse-vae]
    .venv/bin/python bench/world/train_world.py --unet-from bench/world/weights/world_unet_vae.safetensors \
        --unet-steps 1800 --lr 1e-4 --snapshots 900 --out DIR   # longer training: continue the committed UNet

Writes bench/world/weights/world_unet_vae.safetensors (UNet EMA + TAESD, fp16, 53.9 MiB) and the loss
curves (bench/world/weights/losses.json, and a table in bench/RESULTS.md). The VAE stage is kept in
.cache/world/ with a picture of its round trips, so the UNet can be retrained on it (--reuse-vae); one run
and the two-run path give the same weights (each stage starts from its own seed). The text encoder is the
pack's deterministic random CLIP-L (the tiny checkpoint's); its hash is stored so set-up can check it
rebuilt the same one.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent / "scripts")]
import comfy_host  # noqa: E402
import harness  # noqa: E402
from harness import parse_args  # noqa: E402
import model_names as names  # noqa: E402
from build_tiny_models import (WORLD_TEXT_ENCODER, WORLD_TEXT_ENCODER_KEY, clip_hash,  # noqa: E402  (puts the repository
                               scale_to_world_text_encoder_)  # root on the path)
from core.adapter_file import write_safetensors  # noqa: E402
from world import (BASE_SHAPES, BASE_STYLES, CAPTION_FORMS, HELD_OUT_SHAPES, HELD_OUT_STYLES, PORTRAIT, SHAPES,  # noqa: E402
                   SQUARE, STYLES, TWO_OBJECT_FORMS, dataset, phrase, phrase_two, reading_order, two_object_scenes)

WEIGHTS = names.WORLD_WEIGHTS
LOSSES = HERE / "weights" / "losses.json"
VAE_STAGE = HERE.parent.parent / ".cache" / "world" / "vae_stage.safetensors"
VAE_SEED, UNET_SEED = 8, 8  # the committed weights: VAE from a generator seeded 8, UNet from a fresh one seeded 8
SD15_SCALE = 0.18215  # ComfyUI's SD15 latent format: model space = VAE space x 0.18215


def images_tensor(samples) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0


def init_vae_(taesd, generator: torch.Generator) -> None:
    """He init for the ReLU convs, and every residual Block's last conv at zero so each Block starts as its skip.

    A first attempt with N(0, 1/fan_in) everywhere trained to an MSE of 0.03 and decoded every style as one of two
    mean colours (brown or grey-blue), which capped the world model's style accuracy at 10%."""
    from comfy.taesd.taesd import Block

    for module in taesd.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            torch.nn.init.zeros_(module.bias) if module.bias is not None else None
    # A second pass: modules() lists a Block before its convs, so zeroing in the first pass would be undone.
    for module in taesd.modules():
        if isinstance(module, Block):
            torch.nn.init.zeros_(module.conv[-1].weight)
    taesd.taesd_decoder[-1].weight.data.mul_(0.1)  # the image output is linear: start small, not He-scaled
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)


VAE_PREFIX, UNET_PREFIX = "first_stage_model.", "model.diffusion_model."  # the parts of a world weights file


def world_parts(weights: Path, *prefixes: str) -> list[dict[str, torch.Tensor]]:
    """The parts of world weights under each prefix (VAE_PREFIX, UNET_PREFIX), in float32; the file is read once."""
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    parts = [{k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)} for prefix in prefixes]
    for prefix, part in zip(prefixes, parts):
        if not part:
            raise ValueError(f"{weights}: no tensors under {prefix!r}; is it a world weights file?")
    return parts


def cosine_tail(step: int, steps: int) -> float:
    """Learning-rate factor: 1 for the first two thirds, then a cosine down to 0.05."""
    start = 2 * steps // 3
    if step < start:
        return 1.0
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - start) / max(1, steps - start)))


def train_vae(pool: torch.Tensor, steps: int, batch: int, generator: torch.Generator, start: Path | None = None):
    """A TAESD trained on ``pool``: from a fresh init, or fine-tuned from the VAE inside world weights ``start``."""
    from comfy.taesd.taesd import TAESD

    taesd = TAESD(latent_channels=4)
    init_vae_(taesd, generator)
    if start is not None:
        taesd.load_state_dict(world_parts(start, VAE_PREFIX)[0])
    params = list(taesd.taesd_encoder.parameters()) + list(taesd.taesd_decoder.parameters())
    # A fine-tune at 1e-3 wrecked the trained VAE within 20 steps (round-trip content accuracy 99% -> 12%); 2e-4 kept it.
    optimizer = torch.optim.Adam(params, lr=1e-3 if start is None else 2e-4)
    # Constant rate, then a cosine decay over the last third. A latent L2 penalty with OneCycle (run 2) left the
    # MSE at 0.058 and every style brownish; without it the MSE was 0.024 after 100 steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_tail(step, steps))
    losses = []
    for step in range(steps):
        x = pool[torch.randint(0, len(pool), (batch,), generator=generator)]
        loss = torch.nn.functional.mse_loss(taesd.taesd_decoder(taesd.taesd_encoder(x)), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"vae step {step} loss {np.mean(losses[-50:]):.5f}", flush=True)
    return taesd, losses


def set_latent_scale(taesd, pool: torch.Tensor) -> None:
    """vae_scale / vae_shift so that model-space latents (x 0.18215) have mean 0 and std 1, like SD1.5's."""
    with torch.no_grad():
        raw = torch.cat([taesd.taesd_encoder(pool[i:i + 256]) for i in range(0, len(pool), 256)])
        scale = float(raw.std()) * SD15_SCALE
        taesd.vae_scale.fill_(scale)
        taesd.vae_shift.fill_(-float(raw.mean()) / scale)


def model_latents(taesd, pool: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([taesd.encode(pool[i:i + 256] * 2 - 1) for i in range(0, len(pool), 256)]) * SD15_SCALE


def train_unet(pools, conds, empty, steps: int, batch: int, generator: torch.Generator,
               start: dict[str, torch.Tensor] | None = None, lr: float = 5e-4, snapshot=None,
               pool_weights: list[float] | None = None, resume: "TrainingState | None" = None):
    """pools: [(latents (images, 4, h, w), caption_index (images, CAPTIONS_PER_IMAGE))], one per latent size; conds:
    (captions, 77, 768), one per distinct caption, which caption_index rows point at. Each step draws its batch from
    one pool, chosen in proportion to ``pool_weights`` (by default the pools' sizes; with one pool, no draw is made),
    with batch x 64 / (h x w) images, so every step sees about as many latent cells.

    start: a trained UNet's state to continue from (it is also where the EMA starts) instead of a fresh init.
    snapshot(step, ema): called after each step, so a caller can save the EMA on the way.
    resume: where the run's state is kept (TrainingState): it is read back if a cut-off run left it, so the run goes
    on from that step exactly as if it had never stopped, and saved every ``resume.every`` steps. Returns (ema,
    losses), or (None, losses) when ``resume.stop_after`` ended this invocation before the last step."""
    import comfy.ops
    from build_tiny_models import TINY_SD15_UNET_CONFIG, init_weights_
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**TINY_SD15_UNET_CONFIG, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    init_weights_(unet, generator)
    with torch.no_grad():
        unet.out[2].weight.zero_()
    if start is not None:
        unet.load_state_dict(start)
    ema = copy.deepcopy(unet).requires_grad_(False)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - betas, 0).float()
    snr = alphas_bar / (1 - alphas_bar)
    min_snr_weight = snr.clamp(max=5.0) / snr  # Min-SNR-5 weighting for epsilon prediction (Hang et al. 2023)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=min(0.5, max(0.03, 3 / steps)))
    losses = []
    pool_weights = torch.tensor(pool_weights or [float(len(latents)) for latents, _ in pools], dtype=torch.float32)
    first = 0
    if resume is not None and resume.path.is_file():
        first, losses = resume.load(unet, ema, optimizer, schedule, generator)
        print(f"unet: resumed at step {first} of {steps} from {resume.path}", flush=True)
    for step in range(first, steps):
        stopping = resume is not None and step - first == resume.stop_after
        if resume is not None and step > first and (step % resume.every == 0 or stopping):
            resume.save(step, losses, unet, ema, optimizer, schedule, generator)
            if stopping:
                print(f"unet: stopped at step {step} of {steps}; the same command goes on from {resume.path}",
                      flush=True)
                return None, losses
        chosen = 0 if len(pools) == 1 else int(torch.multinomial(pool_weights, 1, generator=generator))
        latents, caption_index = pools[chosen]
        size = max(1, batch * 64 // (latents.shape[-2] * latents.shape[-1]))
        index = torch.randint(0, len(latents), (size,), generator=generator)
        pick = torch.randint(0, caption_index.shape[1], (size,), generator=generator)
        x0, context = latents[index], conds[caption_index[index, pick]].clone()
        drop = torch.rand(size, generator=generator) < 0.1  # classifier-free guidance dropout
        context[drop] = empty
        t = torch.randint(0, 1000, (size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        ab = alphas_bar[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        error = (unet(noisy, t.float(), context=context) - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weight[t] * error).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"unet step {step} loss {np.mean(losses[-50:]):.4f}", flush=True)
        if snapshot is not None:
            snapshot(step + 1, ema)
    return ema, losses


class TrainingState:
    """A UNet run's whole state at a step boundary (weights, EMA, optimizer, schedule, random generator, losses), kept
    in one file so a run cut off by a session's end or a cancel goes on where it was and ends bit for bit as an
    uncut run would. ``run`` names the run (its options); a file left by another run is refused, not mixed in."""

    def __init__(self, path: Path, run: dict, every: int = 100, stop_after: int | None = None):
        self.path, self.every, self.stop_after = path, every, stop_after
        self.run = json.dumps(run, sort_keys=True)  # as the file keeps it
        self.seconds_before, self.started = 0.0, time.time()  # training time of the earlier invocations, this one's start

    @property
    def seconds(self) -> float:
        """The run's training time so far, over every invocation."""
        return self.seconds_before + time.time() - self.started

    def refuse_another_run(self, left: str | None = None) -> None:
        """Stop with the reason if the state file there (or ``left``, its run as already read) was left by a run with
        other options or another start."""
        if left is None and self.path.is_file():
            left = torch.load(self.path, weights_only=True, mmap=True)["run"]
        if left is not None and left != self.run:
            raise SystemExit(f"{self.path} holds the state of another run ({left}), not of this one ({self.run}); "
                             "delete it to start this run afresh")

    def save(self, step: int, losses, unet, ema, optimizer, schedule, generator: torch.Generator) -> None:
        partial = self.path.with_suffix(".partial")
        torch.save({"run": self.run, "step": step, "losses": list(losses),
                    "seconds": self.seconds, "unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state()}, partial)
        os.replace(partial, self.path)

    def load(self, unet, ema, optimizer, schedule, generator: torch.Generator) -> tuple[int, list[float]]:
        state = torch.load(self.path, weights_only=True)
        self.refuse_another_run(state["run"])
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        self.seconds_before, self.started = float(state["seconds"]), time.time()
        return state["step"], list(state["losses"])


CAPTIONS_PER_IMAGE = 4


def training_captions(singles, scenes, generator: np.random.Generator, reading_order_share: float | None = None
                      ) -> list[list[str]]:
    """CAPTIONS_PER_IMAGE captions per image, one drawn per step: single objects in every CAPTION_FORMS form (the
    one-word forms half as often), two-object scenes in every TWO_OBJECT_FORMS form with the objects in either order:
    at random (None), or with this share of the captions naming them as a reader meets them (world.reading_order)."""
    forms = list(CAPTION_FORMS)
    weights = np.array([0.5 if form in ("shape alone", "style alone") else 1.0 for form in forms])
    captions = [[phrase(s.shape, s.style, forms[i]) for i in generator.choice(len(forms), CAPTIONS_PER_IMAGE,
                                                                           p=weights / weights.sum())] for s in singles]
    two_forms = list(TWO_OBJECT_FORMS)
    for scene in scenes:
        rows = []
        for _ in range(CAPTIONS_PER_IMAGE):
            if reading_order_share is None:
                first, second = scene.objects[::-1] if generator.integers(0, 2) else scene.objects
            else:
                order = reading_order(scene)
                first, second = (scene.objects[i] for i in (order if generator.random() < reading_order_share
                                                            else order[::-1]))
            rows.append(phrase_two(first, second, two_forms[generator.integers(0, len(two_forms))]))
        captions.append(rows)
    return captions


CONDS_CACHE = VAE_STAGE.parent / "caption_conds.safetensors"  # the last run's encoded captions (fp32, ~0.6 GB)


def caption_conds(clip, captions: list[str], cache: Path | None) -> torch.Tensor:
    """(captions, 77, 768) float32: the text encoder's output for each caption, in order. Encoding the ~2600 training
    captions takes 5-15 CPU minutes, so the result is kept in ``cache`` and read back when the same encoder (its hash)
    is asked for the same captions; anything else is encoded afresh and replaces the cache."""
    from safetensors import safe_open

    key = f"{clip_hash(clip)}:{hashlib.sha256(json.dumps(captions).encode()).hexdigest()[:16]}"
    if cache is not None and cache.is_file():
        with safe_open(str(cache), "pt") as handle:
            if (handle.metadata() or {}).get("csa.key") == key:
                print(f"{len(captions)} encoded captions read from {cache}", flush=True)
                return handle.get_tensor("conds")
    with torch.no_grad():
        conds = torch.cat([clip.encode_from_tokens(clip.tokenize(c)) for c in captions]).float()
    if cache is not None:
        write_safetensors(cache, {"conds": conds.contiguous()}, {"csa.key": key}, overwrite=True)
    return conds


def world_clip(clip):
    """The world's text encoder (build_tiny_models.WORLD_TEXT_ENCODER), made from the tiny checkpoint's CLIP in place."""
    scale_to_world_text_encoder_(clip.cond_stage_model.state_dict())
    return clip


def round_trip_report(taesd, seed: int = 7) -> tuple[float, float, np.ndarray]:
    """Evaluator accuracy on VAE round trips of fresh images of every shape and style (the ceiling the VAE leaves the UNet), and a picture.

    Returns (content accuracy, style accuracy, image: originals above their round trips, one column per image)."""
    from evaluators import classify, load

    fresh = dataset(SHAPES, STYLES, per_pair=2, seed=seed)  # the held-out shapes and styles too
    x = images_tensor(fresh)
    with torch.no_grad():
        decoded = taesd.taesd_decoder(taesd.taesd_encoder(x)).clamp(0, 1)
    shapes, styles = classify(load()[0], decoded)
    content = float(np.mean([s == f.shape for s, f in zip(shapes, fresh)]))
    style = float(np.mean([s == f.style for s, f in zip(styles, fresh)]))
    pixels = lambda t: (t.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    picked = slice(0, len(fresh), 2)
    picture = np.concatenate([np.concatenate(list(pixels(x[picked])), axis=1),
                              np.concatenate(list(pixels(decoded[picked])), axis=1)], axis=0)
    return content, style, picture


def save_vae(taesd, path: Path, losses: list[float], seconds: float) -> None:
    write_safetensors(path, taesd.state_dict(), {"losses": json.dumps(losses), "seconds": f"{seconds:.0f}"},
                      overwrite=True)


def load_vae(path: Path):
    from comfy.taesd.taesd import TAESD
    from safetensors import safe_open

    taesd = TAESD(latent_channels=4)
    with safe_open(str(path), "pt") as f:
        taesd.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        losses, seconds = json.loads(f.metadata()["losses"]), float(f.metadata()["seconds"])
    return taesd, losses, seconds


def record_training(path: Path = LOSSES, window: int = 100) -> None:
    """Write the loss curves down in bench/RESULTS.md: the mean loss of every `window` steps, with the set-up."""
    from harness import record

    run = json.loads(path.read_text())
    rows = []
    for part in ("vae", "unet"):
        losses = run[part]
        means = [np.mean(losses[i:i + window]) for i in range(0, len(losses), window)]
        rows.append((f"{part} loss, mean per {window} steps ({len(losses)} steps)", ", ".join(f"{m:.4f}" for m in means)))
    rows += [(key.replace("_", " "), str(value)) for key, value in run.get("setup", {}).items()]
    record("World base model training (loss curves)", rows, notes=(
        "VAE loss: pixel MSE of the TAESD round trip on [0, 1] images. UNet loss: Min-SNR-5 weighted epsilon MSE on "
        "SD1.5-scaled 8x8 latents, 10% caption dropout; the saved UNet is the EMA (decay up to 0.999)."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-steps", type=int, default=160)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--per-pair", type=int, default=96, help="single-object images per base (shape, style) pair")
    parser.add_argument("--scenes", type=int, default=2880, help="two-object scenes")
    parser.add_argument("--wide-scenes", action="store_true",
                        help="draw the two-object scenes on the wide canvas (world.render_wide_scene: 64x128 or 128x64, "
                             "each object at a single object's size) instead of both objects in 64x64")
    parser.add_argument("--reading-order", type=float, default=None, metavar="SHARE",
                        help="name a two-object scene's objects left to right / top to bottom in this share of its "
                             "captions, the other way round in the rest (default: either order at random)")
    parser.add_argument("--scene-share", type=float, default=None,
                        help="with --wide-scenes: the share of steps whose batch is wide two-object scenes (default: "
                             "in proportion to the images, about a half)")
    parser.add_argument("--vae-from", type=Path, default=WEIGHTS,
                        help="fine-tune the VAE inside these world weights (a missing file: train one from scratch)")
    parser.add_argument("--vae-only", action="store_true",
                        help=f"train the VAE, write {VAE_STAGE} and its round-trip picture, stop")
    parser.add_argument("--reuse-vae", action="store_true", help=f"skip VAE training and use {VAE_STAGE}")
    parser.add_argument("--unet-from", type=Path, default=None,
                        help="continue training the UNet inside these world weights, on their VAE as it is (the "
                             "latents must not move); --unet-steps then counts the extra steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="the UNet's peak learning rate (one-cycle schedule)")
    parser.add_argument("--snapshots", type=str, default="",
                        help="comma-separated steps at which to also write the EMA weights (<weights>.step<N>.safetensors)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write weights, losses and the VAE stage here instead (smoke runs use a temporary folder)")
    parser.add_argument("--state-every", type=int, default=100,
                        help="save the UNet run's whole state (unet_state.pt beside the VAE stage) every this many "
                             "steps; the same command run again after a cut goes on from there, bit for bit")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                        help="end this invocation after this many UNet steps, state saved (split a long run into "
                             "pieces that fit a session; the same command goes on)")
    args = parse_args(parser, {"vae_steps": 2, "unet_steps": 4, "batch": 2, "per_pair": 1, "scenes": 4})
    if args.out is None and harness.SMOKE:
        args.out = Path(tempfile.mkdtemp(prefix="csa-world-smoke-"))
    weights, losses_path, vae_stage = ((args.out / WEIGHTS.name, args.out / LOSSES.name, args.out / VAE_STAGE.name)
                                       if args.out else (WEIGHTS, LOSSES, VAE_STAGE))
    for folder in {weights.parent, losses_path.parent, vae_stage.parent}:  # --unet-from writes no VAE stage first
        folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    comfy_host.import_comfyui(base_directory=Path(tempfile.mkdtemp()))
    import comfy.sd
    from PIL import Image
    generator = torch.Generator().manual_seed(VAE_SEED)
    singles = dataset(BASE_SHAPES, BASE_STYLES, per_pair=args.per_pair, seed=1)
    scenes = two_object_scenes(args.scenes, seed=1, wide=args.wide_scenes)
    # The 64x64 pictures the VAE trains on, and the UNet's pools of equal-sized pictures (one per canvas shape; with
    # 64x64 scenes, one pool in the committed order, so that run draws the same batches as before).
    canvases = sorted({s.image.shape[:2] for s in scenes} - {SQUARE})
    pool = images_tensor(singles + [s for s in scenes if s.image.shape[:2] == SQUARE])
    tiles = [tile for s in scenes if s.image.shape[:2] != SQUARE
             for tile in np.split(s.image, 2, axis=0 if s.image.shape[:2] == PORTRAIT else 1)]
    # The VAE also sees the held-out shapes and styles (as a real VAE has seen everything); the UNet never does.
    held_out = [s for s in dataset(SHAPES, STYLES, per_pair=max(1, args.per_pair // 6), seed=2)
                if s.shape in HELD_OUT_SHAPES or s.style in HELD_OUT_STYLES]
    snapshot_steps = {int(n) for n in args.snapshots.split(",") if n.strip()}
    if args.scene_share is not None and not (args.wide_scenes and 0 < args.scene_share < 1):
        parser.error("--scene-share needs --wide-scenes and a share between 0 and 1")
    if args.reading_order is not None and not 0 <= args.reading_order <= 1:
        parser.error("--reading-order is a share between 0 and 1")
    if args.unet_from is not None and args.reuse_vae:
        parser.error("--unet-from keeps the VAE inside those weights; --reuse-vae would swap in another one")
    # The run's name for its saved state; a state left by another run is refused here, before minutes of set-up.
    run = {option: getattr(args, option) for option in ("unet_steps", "batch", "lr", "per_pair", "scenes",
                                                         "wide_scenes", "reading_order", "scene_share")}
    run["start"] = (f"{args.unet_from.name} sha256 {hashlib.sha256(args.unet_from.read_bytes()).hexdigest()}"
                    if args.unet_from is not None else f"fresh UNet, VAE {'reused' if args.reuse_vae else args.vae_steps}")
    state = TrainingState(vae_stage.parent / "unet_state.pt", run, args.state_every, args.stop_after)
    state.refuse_another_run()
    if harness.SMOKE and snapshot_steps:  # smoke runs have a few steps only: snapshot half-way so the path runs
        snapshot_steps = {args.unet_steps // 2}
    started = time.time()
    unet_start = None  # the UNet state to continue from (--unet-from)
    if args.unet_from is not None:
        from comfy.taesd.taesd import TAESD

        vae_state, unet_start = world_parts(args.unet_from, VAE_PREFIX, UNET_PREFIX)
        taesd = TAESD(latent_channels=4)
        taesd.load_state_dict(vae_state)
        vae_losses, vae_seconds = [], 0.0
    elif args.reuse_vae:
        taesd, vae_losses, vae_seconds = load_vae(vae_stage)
    else:
        vae_pool = torch.cat([pool, images_tensor(held_out)] + ([torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
                                                                  .float() / 255.0] if tiles else []))
        taesd, vae_losses = train_vae(vae_pool, args.vae_steps, args.batch, generator,
                                      args.vae_from if args.vae_from.exists() else None)
        set_latent_scale(taesd, vae_pool)
        vae_seconds = time.time() - started
        save_vae(taesd, vae_stage, vae_losses, vae_seconds)
    content, style, picture = round_trip_report(taesd)
    Image.fromarray(picture).save(vae_stage.with_suffix(".png"))
    vae_final = f"{np.mean(vae_losses[-50:]):.5f}" if vae_losses else f"untrained here (from {args.unet_from})"
    print(f"vae: final loss {vae_final}; evaluators on round trips: content {content:.1%}, "
          f"style {style:.1%}; picture {vae_stage.with_suffix('.png')}", flush=True)
    if args.vae_only:
        return
    latents = model_latents(taesd, pool)
    print(f"latent std {latents.std():.3f} mean {latents.mean():.3f}")
    canvas_of = [[i for i, s in enumerate(scenes) if s.image.shape[:2] == shape] for shape in canvases]
    canvas_latents = [model_latents(taesd, images_tensor([scenes[i] for i in chosen])) for chosen in canvas_of]
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(comfy_host.TINY_MODELS_DIR / names.TINY_CHECKPOINT_NAME),
                                                          output_model=False, output_vae=False)
    clip = world_clip(clip)
    captions = training_captions(singles, scenes, np.random.default_rng(UNET_SEED), args.reading_order)
    distinct = sorted({c for row in captions for c in row}) + [""]
    row_of = {c: i for i, c in enumerate(distinct)}
    conds = caption_conds(clip, distinct, None if harness.SMOKE else CONDS_CACHE)
    caption_index = torch.tensor([[row_of[c] for c in row] for row in captions])
    in_pool = len(pool)  # the first rows of captions: singles, then the 64x64 scenes
    pools = [(latents, caption_index[:in_pool])]
    pools += [(lat, caption_index[[len(singles) + i for i in chosen]]) for lat, chosen in zip(canvas_latents, canvas_of)]
    pool_weights = None
    if args.scene_share is not None:  # the single pictures' pool, then the wide scenes' pools by their sizes
        wide = np.array([len(lat) for lat, _ in pools[1:]], np.float64)
        pool_weights = [1 - args.scene_share] + list(args.scene_share * wide / wide.sum())
    print(f"{len(distinct)} distinct captions encoded in {time.time() - started:.0f} s", flush=True)
    scenes_described = (f"{len(singles)} single-object, {len(scenes)} two-object"
                        + (" (wide canvas)" if args.wide_scenes else "")
                        + (f", {args.scene_share:.0%} of steps on two objects" if args.scene_share is not None else "")
                        + (f", {args.reading_order:.0%} of their captions in reading order"
                           if args.reading_order is not None else ""))
    meta = {"csa.world_clip_hash": clip_hash(clip), WORLD_TEXT_ENCODER_KEY: WORLD_TEXT_ENCODER,
            "csa.vae_steps": str(len(vae_losses)), "csa.scenes": scenes_described,
            "csa.unet_steps": str(args.unet_steps), "csa.batch": str(args.batch),
            "csa.vae_round_trip_accuracy": f"content {content:.3f}, style {style:.3f}"}
    if args.unet_from is not None:  # the VAE and the earlier UNet steps are the source's: its metadata says them
        from safetensors import safe_open

        with safe_open(str(args.unet_from), "pt") as handle:
            source = handle.metadata() or {}
        meta.update({"csa.vae_steps": source.get("csa.vae_steps", "?"), "csa.continued_from": args.unet_from.name,
                     "csa.unet_steps_before": source.get("csa.unet_steps", "?"), "csa.unet_lr": str(args.lr)})

    def save_weights(unet, path: Path, steps: int) -> None:
        state = {f"{UNET_PREFIX}{k}": v for k, v in unet.state_dict().items()}
        state.update({f"{VAE_PREFIX}{k}": v for k, v in taesd.state_dict().items()
                      if k.startswith(("taesd_encoder.", "taesd_decoder.", "vae_"))})
        write_safetensors(path, {k: v.to(torch.float16) for k, v in state.items()},
                          {**meta, "csa.unet_steps": str(steps)}, overwrite=True)

    def snapshot(step: int, ema) -> None:
        if step in snapshot_steps and step < args.unet_steps:
            path = weights.with_suffix(f".step{step}.safetensors")
            save_weights(ema, path, step)
            print(f"wrote {path}", flush=True)

    unet, unet_losses = train_unet(pools, conds, conds[row_of[""]], args.unet_steps, args.batch,
                                   torch.Generator().manual_seed(UNET_SEED), lr=args.lr, snapshot=snapshot,
                                   start=unet_start, pool_weights=pool_weights, resume=state)
    if unet is None:
        return
    unet_seconds = state.seconds
    print(f"all done in {time.time() - started:.0f} s")
    save_weights(unet, weights, args.unet_steps)
    setup = {"batch": args.batch, "images": scenes_described,
             "captions": f"{len(distinct) - 1} distinct, {CAPTIONS_PER_IMAGE} per image, one drawn per step", "vae_steps": len(vae_losses), "vae_seconds": round(vae_seconds),
             "vae_final_mse": round(float(np.mean(vae_losses[-50:])), 5) if vae_losses else "-",
             "unet_steps": args.unet_steps if args.unet_from is None else f"{args.unet_steps} more, from {args.unet_from.name}",
             "unet_peak_lr": args.lr,
             "unet_seconds": round(unet_seconds), "vae_round_trip_accuracy": meta["csa.vae_round_trip_accuracy"],
             "weights_MiB": round(weights.stat().st_size / 2**20, 1)}
    partial = losses_path.with_suffix(".partial")
    partial.write_text(json.dumps({"vae": vae_losses, "unet": unet_losses, "setup": setup}))
    os.replace(partial, losses_path)
    state.path.unlink(missing_ok=True)  # the run is finished: its state has nothing left to resume
    print(f"wrote {weights} ({setup['weights_MiB']} MiB)")
    record_training(losses_path)


if __name__ == "__main__":
    main()
