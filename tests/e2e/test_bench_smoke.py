"""Every bench script and every make target's script runs at its smoke size, so none of them can rot.

Each command is the one a make target or bench/README runs, with --smoke: the same code paths at tiny
sizes. A smoke run writes nothing into the repository (bench/RESULTS.md, committed weights and pictures
stay as they are); that is checked too.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_SCRIPTS = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "bench").glob("*.py")
                       if p.name != "harness.py")
# make target -> its scripts (Makefile): world, evaluate, demo-adapters, judge-adapters, block-split, benchmark
MAKE_TARGET_SCRIPTS = [
    ["bench/world/evaluators.py", "train"],
    ["bench/world/train_world.py"],
    ["bench/world/evaluate.py", "--square-scenes"],  # make evaluate, and (b) at 64x64 too
    ["bench/world/evaluate.py", "--parts", "c"],  # the attention part alone
    ["bench/world/block_split.py"],  # make block-split
    ["bench/world/block_split.py", "--premise"],  # make benchmark's first step
    ["bench/world/train_demo_adapters.py"],  # make demo-adapters
    ["bench/world/train_b4m_residual_demos.py"],  # make demo-adapters
    ["bench/world/judge_demo_adapters.py"],  # make judge-adapters
]  # make benchmark: test_benchmark_smoke_in_two_workers_produces_every_row
SERVER_SCRIPTS = [  # make demo: they start a real server on a base directory of their own
    ["scripts/world_grid.py", "--smoke"],
    ["scripts/run_workflows.py", "workflows/api/apply_adapter.json"],
    ["scripts/demo_adapters_grid.py", "--smoke"],
]


def repository_state() -> dict[str, str]:
    """Hashes of every file a bench or training script may write in the repository."""
    world = REPO_ROOT / "bench" / "world"
    watched = [REPO_ROOT / "bench" / "RESULTS.md", *sorted(world.rglob("*.png")),
               *(p for folder in ("weights", "adapters", "benchmark") for p in sorted((world / folder).rglob("*"))
                 if p.is_file())]  # every file, in sub-folders too (a folder is no file to hash)
    return {str(p.relative_to(REPO_ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in watched}


def run(command: list[str], *extra: str) -> str:
    """The command's output, after checking that it succeeded and left the repository as it was."""
    before = repository_state()
    done = subprocess.run([sys.executable, *command, *extra], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)
    said = " ".join([*command, *extra])
    assert done.returncode == 0, f"{said} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert repository_state() == before, f"{said} changed files in the repository"
    return done.stdout


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_bench_script_smoke(script):
    run([script], "--smoke")


@pytest.mark.parametrize("command", MAKE_TARGET_SCRIPTS, ids=" ".join)
def test_make_target_script_smoke(command):
    run(command, "--smoke")


@pytest.mark.parametrize("command", SERVER_SCRIPTS, ids=lambda c: c[0])
def test_demo_script_smoke(command, tmp_path):
    import comfy_host

    base = comfy_host.make_base_directory(tmp_path / "base")
    run(command, "--base", str(base))


def test_world_training_continues_the_committed_weights(tmp_path):
    """train_world.py --unet-from (longer training) at the smoke size, on the wide two-object canvas (--wide-scenes:
    batches of three latent shapes, --scene-share, --reading-order), at a learning rate of 0: the written UNet and
    VAE, and the half-way snapshot's, are the committed ones bit for bit, and the metadata keeps the source's steps and
    names the canvas and the two-object options."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = REPO_ROOT / "bench" / "world" / "weights" / "world_unet_vae.safetensors"
    out = tmp_path / "continued"  # not there yet: the script makes it
    run(["bench/world/train_world.py", "--unet-from", str(source.relative_to(REPO_ROOT)), "--lr", "0",
         "--snapshots", "900", "--wide-scenes", "--scene-share", "0.75", "--reading-order", "0.9", "--out", str(out)],
        "--smoke")
    committed = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        committed_meta = handle.metadata()
    for name, steps in (("world_unet_vae.safetensors", "4"), ("world_unet_vae.step2.safetensors", "2")):
        written = load_file(str(out / name))
        assert written.keys() == committed.keys()
        assert all(torch.equal(written[k], committed[k]) for k in committed), name
        with safe_open(str(out / name), "pt") as handle:
            meta = handle.metadata()
        assert meta["csa.unet_steps"] == steps and meta["csa.unet_steps_before"] == committed_meta["csa.unet_steps"]
        assert meta["csa.vae_steps"] == committed_meta["csa.vae_steps"]
        assert meta["csa.continued_from"] == source.name
        assert meta["csa.scenes"].endswith("two-object (wide canvas), 75% of steps on two objects, 90% of their "
                                           "captions in reading order"), meta["csa.scenes"]


@pytest.mark.full  # three world-training runs (100 s): the default suite runs train_world.py's smoke and continuation
def test_world_training_cut_and_resumed_equals_one_run(tmp_path):
    """A UNet run cut off half-way (--stop-after, as a session's end would) and started again with the same command
    ends with the weights and loss curve of the uncut run, bit for bit, and removes its state file; a state file of
    another run (another learning rate) is refused by name, not mixed in."""
    from safetensors.torch import load_file

    source = "bench/world/weights/world_unet_vae.safetensors"
    command = ["bench/world/train_world.py", "--unet-from", source, "--wide-scenes", "--scene-share", "0.75",
               "--reading-order", "0.9", "--lr", "2e-4"]
    run([*command, "--out", str(tmp_path / "uncut")], "--smoke")
    cut = [*command, "--out", str(tmp_path / "cut")]
    said = run([*cut, "--stop-after", "2"], "--smoke")
    state = tmp_path / "cut" / "unet_state.pt"
    assert "stopped at step 2 of 4" in said and state.is_file() and not (tmp_path / "cut" / "world_unet_vae.safetensors").exists()
    other = subprocess.run([sys.executable, *command[:-1], "1e-4", "--out", str(tmp_path / "cut"), "--smoke"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert other.returncode != 0 and "holds the state of another run" in other.stderr and str(state) in other.stderr
    assert "resumed at step 2 of 4" in run(cut, "--smoke")
    uncut, resumed = (load_file(str(tmp_path / name / "world_unet_vae.safetensors")) for name in ("uncut", "cut"))
    assert resumed.keys() == uncut.keys() and all(torch.equal(resumed[k], uncut[k]) for k in uncut)
    committed = load_file(str(REPO_ROOT / source))
    assert any(not torch.equal(resumed[k], committed[k]) for k in committed)  # it trained: the comparison could fail
    losses = [json.loads((tmp_path / name / "losses.json").read_text())["unet"] for name in ("uncut", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert not state.exists()


def table_without_timings(output: str) -> list[list[str]]:
    """The printed result table's cells, without the columns that measure time (they differ run to run)."""
    lines = [line.strip().strip("|").split(" | ") for line in output.splitlines() if line.startswith("| ")]
    header, rows = lines[0], [row for row in lines[1:] if not row[0].startswith(" ---")]
    timed = {i for i, name in enumerate(header) if "CPU s" in name}
    return [[cell for i, cell in enumerate(row) if i not in timed] for row in rows]


BENCHMARK = "bench/world/method_benchmark.py"


def benchmark_rows() -> int:
    sys.path[:0] = [str(REPO_ROOT / "bench" / "world"), str(REPO_ROOT / "bench")]
    import method_benchmark

    return len(method_benchmark.ROWS)


def test_benchmark_smoke_in_two_workers_produces_every_row(tmp_path):
    """make benchmark's smoke, as the target runs it (two workers): every row in the table."""
    workers = table_without_timings(run([BENCHMARK], "--smoke", "--workers", "2", "--out", str(tmp_path)))
    assert len(workers) == benchmark_rows()


def test_entangled_benchmark_smoke_in_two_workers_produces_every_row_with_its_leaks(tmp_path):
    """make benchmark's entangled protocol (one style / one shape per reference), smoke size: every row, the leak
    columns, the headline per case (a base-style and a held-out-style content reference)."""
    output = run([BENCHMARK], "--smoke", "--protocol", "entangled", "--workers", "2", "--out", str(tmp_path))
    header = next(line for line in output.splitlines() if line.startswith("| method"))
    assert "content leak in the composition" in header and "style leak in the composition" in header
    rows = table_without_timings(output)
    assert len(rows) == benchmark_rows()
    per_case = header.strip("| ").split(" | ").index("both right per case")
    assert rows[0][per_case].startswith("checkered x1: ") and ", speckled x1: " in rows[0][per_case]
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert recorded["settings"]["protocol"] == "entangled"
    assert all("style_leak_alone" in r and "content_leak" in r for r in recorded["rows"] if "chosen" in r)
    assert {key.split("|")[2] for key in recorded["fingerprints"]} == {
        "star:checkered:1", "star:speckled:1", "zigzag:circle:1"}


@pytest.mark.full  # two more benchmark smokes (170 s) beside the default suite's one
def test_benchmark_in_workers_equals_one_process(tmp_path):
    """make benchmark's smoke (every row produced) in two workers and in one process gives the same table, training
    and sampling times aside: the workers' merge is exact and a run reproduces itself. Then --style-alone-only on the
    one-process run retrains the style adapters (same fingerprints) and measures the same style-alone leakage."""
    script = BENCHMARK
    workers, alone = (table_without_timings(run([script], "--smoke", "--workers", n, "--out", str(tmp_path / n)))
                      for n in ("2", "1"))
    assert len(workers) == benchmark_rows() and workers == alone
    recorded = json.loads((tmp_path / "1" / "results.json").read_text())
    measured = [r for r in recorded["rows"] if "chosen" in r]
    assert all("leakage_alone" in r for r in measured)
    run([script], "--smoke", "--style-alone-only", "--out", str(tmp_path / "1"))
    added = json.loads((tmp_path / "1" / "results.json").read_text())
    styles = {key: value for key, value in recorded["fingerprints"].items() if "|style|" in key}
    assert added["style_alone_pass"]["fingerprints"] == styles  # the pass trained exactly the run's style adapters
    assert [r.get("leakage_alone") for r in added["rows"]] == [r.get("leakage_alone") for r in recorded["rows"]]
    assert [{k: v for k, v in r.items() if k != "leakage_alone"} for r in added["rows"]] == \
        [{k: v for k, v in r.items() if k != "leakage_alone"} for r in recorded["rows"]]


def test_b4m_demo_stages_in_separate_processes(tmp_path):
    """make demo-adapters' B4M stages split over processes (the rank-8 'b4m' recipe; the make-target smoke runs
    the demo's): the two runs saved by one process, B4M Make of those files (through Load Adapter) in another; Make alone
    without them stops with the missing file's name."""
    script, out = "bench/world/train_b4m_residual_demos.py", ["--smoke", "--out", str(tmp_path), "--b4m-recipe", "b4m"]
    runs = table_without_timings(run([script], *out, "--only", "b4m_content,b4m_style"))
    assert [row[0].strip() for row in runs] == ["csa_world_b4m_star (B4M content run)", "csa_world_b4m_zigzag (B4M style run)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csa_world_b4m_star.safetensors",
                                                          "csa_world_b4m_zigzag.safetensors"]
    made = table_without_timings(run([script], *out, "--only", "b4m_make"))
    assert [row[0].split(" on the ")[-1].strip() for row in made] == ["star prompts", "zigzag prompts"]
    assert (tmp_path / "csa_world_b4m_made.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    alone = subprocess.run([sys.executable, script, "--smoke", "--out", str(empty), "--only", "b4m_make"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=900)
    assert alone.returncode != 0 and f"{empty / 'csa_world_b4m_star.safetensors'} is missing" in alone.stderr
    assert list(empty.iterdir()) == []
