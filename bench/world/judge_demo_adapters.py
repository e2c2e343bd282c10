"""Judge the committed world demo adapters on the current world checkpoint, without training them again.

    .venv/bin/python bench/world/judge_demo_adapters.py [--only lora,b4m,residual] [--seeds 4] [--judge-seed 1000]

The demo adapters are trained on one world base model (train_demo_adapters.py, train_b4m_residual_demos.py); when
the base model moves on (bench/world/train_world.py --unet-from), this says whether the committed files still do what
bench/RESULTS.md and the README say, with the same prompts, sampler, seeds and evaluators as their training scripts:
every file goes through Load Adapter as a user's would, the LoRA-kind files through Apply Adapters ('a <base style>
sks' must give a star, 'a zkz <base shape>' a zigzag; the B4M made adapter on both), the residual through Apply
Localized Residual with LAG on and off.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from harness import parse_args, record  # noqa: E402
from model_names import (WORLD_DEMO_ADAPTERS, WORLD_DEMO_B4M_MADE, WORLD_DEMO_RESIDUAL,  # noqa: E402  (scripts/ is on the
                         WORLD_DEMO_RESIDUAL_CLASS)  # path through harness)
from train_b4m_residual_demos import judge_residual  # noqa: E402
from train_demo_adapters import SAMPLING, judged, world_session  # noqa: E402

GROUPS = (*WORLD_DEMO_ADAPTERS, "residual")  # lora, consislora, qr, b4m (its runs and its made adapter), residual


def loaded(nodes, name: str):
    return nodes["CSA_LoadAdapter"].execute(adapter_name=name, strength=1.0, part="whole file", role="from file").args[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=6, help="judge with the first N prompts (5 styles / 6 shapes)")
    parser.add_argument("--sample-steps", type=int, default=SAMPLING["steps"])
    parser.add_argument("--judge-seed", type=int, default=SAMPLING["seed"],
                        help="first sampling seed of the judgement (seeds judge-seed .. judge-seed + seeds - 1)")
    args = parse_args(parser, {"seeds": 1, "prompts": 1, "sample_steps": 2})
    chosen = [group.strip() for group in args.only.split(",") if group.strip()]
    unknown = sorted(set(chosen) - set(GROUPS))
    if unknown or not chosen:
        parser.error(f"--only: unknown group(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(GROUPS)}")
    nodes, model, clip, vae, evaluators = world_session()
    files = [(name, kind) for group in chosen if group in WORLD_DEMO_ADAPTERS
             for name, kind in zip(WORLD_DEMO_ADAPTERS[group], ("star", "zigzag"))]
    files += [(WORLD_DEMO_B4M_MADE, kind) for kind in ("star", "zigzag") if "b4m" in chosen]
    rows, notes = [], []
    for name, kind in files:
        share, labels = judged(nodes, model, clip, vae, loaded(nodes, name), kind, evaluators, args)
        rows.append((f"{Path(name).stem} on the {kind} prompts", f"{share:.0%} {kind}"
                     + (f" ({'pass' if share >= 0.8 else 'FAIL'} at 80%)" if name != WORLD_DEMO_B4M_MADE else "")))
        notes.append(f"- {Path(name).stem}, {kind} prompts: " + "; ".join(labels))
        print(rows[-1], flush=True)
    if "residual" in chosen:
        more_rows, more_notes = judge_residual(nodes, model, clip, vae, evaluators, loaded(nodes, WORLD_DEMO_RESIDUAL),
                                               WORLD_DEMO_RESIDUAL_CLASS, args)
        rows, notes = rows + more_rows, notes + more_notes
        print(*more_rows, sep="\n", flush=True)
    import evaluate

    record(f"World demo adapters judged again on {evaluate.WORLD_CHECKPOINT.name} (the committed files, not retrained)",
           rows, notes=(f"Each file through Load Adapter; judged with Euler {args.sample_steps} steps, CFG {SAMPLING['cfg']}, "
                        f"seeds {args.judge_seed}..{args.judge_seed + args.seeds - 1}, the first {args.prompts} prompts. "
                        "Labels per prompt:\n\n" + "\n".join(notes)))


if __name__ == "__main__":
    main()
