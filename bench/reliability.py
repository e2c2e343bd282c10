"""Reliability under load, and a bounded fuzz of the file reader.

    .venv/bin/python bench/reliability.py [--prompts 50] [--fuzz 5000] [--smoke]

Load: a real server gets every prompt at once (the shipped workflows with other seeds, strengths and λ,
methods interleaved), then each prompt again alone with ComfyUI's caches freed in between. Every image
must be identical to the one its prompt made alone (no patch leaks, no shared state between prompts), and
the server's resident memory after the queue drains must be within 5% of its level after a warm-up pass, both
measured like for like: ComfyUI's caches freed, then the same prompt run (the memory right after draining, which
holds the last queued prompt's cache, is reported too).
Fuzz: random truncations, byte flips, header-length lies and junk headers of a valid adapter file; each
must read as safetensors or raise AdapterFileError naming the file, never anything else.
Exits non-zero when a check fails; full runs append their figures to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from harness import REPO_ROOT, comfy_host, parse_args, record

WORKFLOWS = ("apply_adapter", "localized_residual", "qr_merge", "content_style_guider")
VARIED = {"seed": lambda i: 1000 + i, "noise_seed": lambda i: 2000 + i, "strength": lambda i: 0.5 + 0.25 * (i % 4),
          "lambda_style": lambda i: 0.25 * (i % 5)}


def images_only(graph: dict) -> dict:
    """The graph's SaveImage nodes and what they need (no adapter saves or text previews)."""
    keep, todo = set(), [k for k, v in graph.items() if v["class_type"] == "SaveImage"]
    while todo:
        node = todo.pop()
        if node not in keep:
            keep.add(node)
            todo += [v[0] for v in graph[node]["inputs"].values() if isinstance(v, list)]
    return {k: graph[k] for k in keep}


def load_prompts(count: int) -> list[dict]:
    bases = [images_only(json.loads((REPO_ROOT / "workflows" / "api" / f"{w}.json").read_text())) for w in WORKFLOWS]
    prompts = []
    for i in range(count):
        graph = copy.deepcopy(bases[i % len(bases)])
        for node_id, node in graph.items():
            for name, vary in VARIED.items():
                if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                    node["inputs"][name] = vary(i)
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"csa_load/p{i:03d}_{node_id}"
        prompts.append(graph)
    return prompts


def resident_mib(server) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(paths)]


def free_caches(server) -> None:
    """ComfyUI's /free: the idle worker resets its caches when woken; give it a moment before the next prompt."""
    server.post_json("/free", {"free_memory": True})
    time.sleep(1.0)


def wait_idle(server, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.5)
    raise TimeoutError("the queue did not drain")


def bad_input_families(object_info: dict) -> dict[str, int]:
    """How many cases each family of the bad-input suite (tests/e2e/test_bad_inputs.py, run by make test) has for
    this server's nodes: the suite's own case builders, counted here so the figures come with the run."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))
    import test_bad_inputs as suite

    return {"files": len(suite.file_cases()), "parameters": len(suite.parameter_cases(object_info)),
            "writers": len(suite.writer_cases()), "prompts": len(suite.prompt_cases())}


def run_load(count: int) -> dict:
    base = comfy_host.make_base_directory(Path(tempfile.mkdtemp(prefix="csa-load-")))
    prompts = load_prompts(count)
    with comfy_host.ComfyServer(base) as server:
        families = bad_input_families(server.get_json("/object_info"))
        for graph in load_prompts(len(WORKFLOWS)):  # warm-up: every model and method once
            server.run_prompt(graph)
        baseline = load_prompts(1)[0]  # memory is measured after it, caches freed, before and after the load
        free_caches(server)
        server.run_prompt(baseline)
        start_rss = resident_mib(server)
        started = time.monotonic()
        ids = [server.post_json("/prompt", {"prompt": g, "client_id": "load"})["prompt_id"] for g in prompts]
        wait_idle(server)
        queued_seconds = time.monotonic() - started
        drained_rss = resident_mib(server)
        free_caches(server)  # like the warm-up's measure: what the queue left behind, not the last prompt's cache
        server.run_prompt(baseline)
        settled_rss = resident_mib(server)
        queued = {}
        for i, prompt_id in enumerate(ids):
            history = server.get_json(f"/history/{prompt_id}")[prompt_id]
            if history["status"]["status_str"] != "success":
                raise AssertionError(f"prompt {i} failed under load: {history['status']}")
            queued[i] = pixels(p for paths in server._images_by_node(history).values() for p in paths)
        mismatches = []
        for i, graph in enumerate(prompts):
            free_caches(server)  # nothing cached: the prompt runs from scratch
            alone = server.run_prompt(graph)
            if len(pixels(alone.output_images)) != len(queued[i]) or any(
                    not np.array_equal(a, b) for a, b in zip(pixels(alone.output_images), queued[i])):
                mismatches.append(i)
        final_rss = resident_mib(server)
    return {"prompts": count, "families": families, "mismatches": mismatches, "queued_seconds": queued_seconds,
            "start_rss": start_rss,
            "drained_rss": drained_rss, "settled_rss": settled_rss, "final_rss": final_rss}


def run_fuzz(count: int, seed: int = 0) -> dict:
    import sys

    import torch
    from safetensors.torch import save

    sys.path.insert(0, str(REPO_ROOT))
    from core.adapter_file import AdapterFileError, read_safetensors

    rng = np.random.default_rng(seed)
    valid = save({"lora_unet_x.lora_up.weight": torch.randn(4, 2), "lora_unet_x.lora_down.weight": torch.randn(2, 3)},
                 {"csa.role": "style"})
    folder = Path(tempfile.mkdtemp(prefix="csa-fuzz-"))
    outcomes = {"read": 0, "refused": 0, "escaped": []}
    for i in range(count):
        blob = bytearray(valid)
        action = rng.integers(4)
        if action == 0:
            blob = blob[:rng.integers(0, len(blob))]
        elif action == 1:
            for _ in range(rng.integers(1, 9)):
                blob[rng.integers(0, len(blob))] = rng.integers(0, 256)
        elif action == 2:
            blob[:8] = struct.pack("<Q", int(rng.integers(0, 2**40)))
        else:
            junk = rng.integers(0, 256, rng.integers(0, 65)).astype(np.uint8).tobytes()
            blob = bytearray(struct.pack("<Q", len(junk)) + junk + bytes(blob[8:]))
        path = folder / f"fuzz{i}.safetensors"
        path.write_bytes(bytes(blob))
        try:
            read_safetensors(path)
            outcomes["read"] += 1
        except AdapterFileError as error:
            outcomes["refused"] += 1
            if path.name not in str(error):
                outcomes["escaped"].append(f"{path.name}: error does not name the file: {error}")
        except Exception as error:  # noqa: BLE001 - anything else is the finding
            outcomes["escaped"].append(f"{path.name}: {type(error).__name__}: {error}")
        path.unlink()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--fuzz", type=int, default=5000)
    args = parse_args(parser, {"prompts": 4, "fuzz": 100})
    fuzz = run_fuzz(args.fuzz)
    load = run_load(args.prompts)
    rss_change = load["settled_rss"] / load["start_rss"] - 1
    record(f"Reliability: {args.prompts} prompts queued at once, {args.fuzz} fuzzed files", [
        ("prompts whose images differ from the same prompt run alone", f"{len(load['mismatches'])} of {args.prompts}"),
        ("queue of all prompts drained in", f"{load['queued_seconds']:.0f} s"),
        ("server RSS after warm-up / right after the queue drained / drained, caches freed and the warm-up's prompt "
         "rerun / after the alone runs",
         f"{load['start_rss']:.0f} / {load['drained_rss']:.0f} / {load['settled_rss']:.0f} / "
         f"{load['final_rss']:.0f} MiB ({rss_change * 100:+.1f}% like for like; limit ±5%)"),
        ("fuzzed files: read as valid / refused with AdapterFileError naming the file / anything else",
         f"{fuzz['read']} / {fuzz['refused']} / {len(fuzz['escaped'])}"),
        ("bad-input suite through the server (tests/e2e/test_bad_inputs.py, every make test): cases",
         f"{sum(load['families'].values())} ({', '.join(f'{n} {k}' for k, n in load['families'].items())}); each "
         f"asserts its own error text, that no file changed and that the next prompt runs"),
        ("cancels (tests/e2e/test_cancel.py through the server; merge, conversion and trainers in tests/host)",
         "IPL mapper training, Train Adapter (cancelled once a periodic save exists) and sampling through "
         "/interrupt: idle after, no final or partial file, periodic saves whole, next prompt runs; QR "
         "Merge, Convert to QR-LoRA, Train Adapter / ConsisLoRA / QR-LoRA / B4M / Personalized Residual: no file, "
         "model untouched"),
    ], notes="Methods interleaved: " + ", ".join(WORKFLOWS) + "; seeds, strengths and λ vary per prompt. "
             "Alone runs free ComfyUI's caches first, so each one samples from scratch.")
    failed = load["mismatches"] or fuzz["escaped"] or abs(rss_change) > 0.05
    for line in fuzz["escaped"][:20]:
        print("fuzz:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
