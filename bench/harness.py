"""Shared set-up for benchmarks: ComfyUI in-process with the pack loaded, SD1.5-shaped models, timing, results.

Benchmarks compare the pack against ComfyUI's own nodes in the same run and report ratios; absolute
seconds depend on the machine, which is written next to every result.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "scripts")]
import comfy_host  # noqa: E402
import model_names as names  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
SMOKE = False  # set by parse_args(--smoke): every code path at a tiny size, results printed, nothing written


def parse_args(parser: argparse.ArgumentParser, smoke_defaults: dict | None = None) -> argparse.Namespace:
    """Parse a bench's arguments, adding --smoke: the same code paths at the sizes in ``smoke_defaults``, printed
    only (RESULTS.md and committed files stay untouched). ``make test`` runs every bench this way."""
    global SMOKE
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, every code path, nothing written (what make test runs)")
    args = parser.parse_args()
    SMOKE = args.smoke
    if SMOKE:
        for name, value in (smoke_defaults or {}).items():
            setattr(args, name, value)
    return args

SD15_FULL_UNET_CONFIG = {  # the real SD1.5 UNet layout (860M parameters)
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "num_heads": 8, "num_head_channels": -1, "context_dim": 768, "use_spatial_transformer": True,
    "use_linear_in_transformer": False, "legacy": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


_ENCODINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CLIP object -> {prompt: conditioning}


def encode_prompt(clip, text: str) -> list:
    """ComfyUI conditioning of ``text``, encoded once per CLIP object and prompt: the world benches sample the same
    prompts (and the empty negative) many times, and each encode is a full CLIP-L pass. Safe because ComfyUI and the
    pack never patch a CLIP in place (a CLIP with a text-encoder adapter is a clone, so it has its own entries)."""
    encoded = _ENCODINGS.setdefault(clip, {})
    if text not in encoded:
        encoded[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return encoded[text]


def start_comfy():
    """Import ComfyUI, load the pack through ComfyUI's loader; returns (NODE_CLASS_MAPPINGS, base directory)."""
    base = comfy_host.make_base_directory(Path(tempfile.mkdtemp(prefix="csa-bench-")))
    comfy_host.import_comfyui(base_directory=base)
    return comfy_host.load_pack_in_process(base), base


def tiny_sd15():
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_host.TINY_MODELS_DIR / names.TINY_CHECKPOINT_NAME))
    return model, clip, vae


def full_sd15_unet(seed: int = 0):
    """A full-size SD1.5 UNet with random weights (no download), wrapped in a ComfyUI ModelPatcher."""
    import torch

    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_FULL_UNET_CONFIG))
    model = config.get_model({}, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
            else:
                param.fill_(1.0 if param.ndim == 1 else 0.0)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def median_seconds(function, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def record(title: str, rows: list[tuple], notes: str = "", append: bool = True,
           columns: tuple[str, ...] = ("measure", "value")) -> None:
    """Print a result table and append it to bench/RESULTS.md (print only with ``append=False``, for smoke runs)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title}", "", f"{stamp} · {machine()}", "", "| " + " | ".join(columns) + " |",
             "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n\n"
    print(text)
    if SMOKE or not append:
        print("(smoke run: not written to bench/RESULTS.md)" if SMOKE else "(not written to bench/RESULTS.md)")
        return
    with open(RESULTS, "a") as handle:
        handle.write(text)
