"""The K-LoRA node on the tiny SD1.5 model, in real ComfyUI sampling: at every switched layer and sampler step the
change it adds is the winner's ΔW x of a float64 reference of the paper's rule; one adapter zero is that adapter alone."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from support.klora_reference import reference_gamma, reference_winner
from support.lora_files import build_file

pytestmark = pytest.mark.host

ATTENTION = [f"{block}.transformer_blocks.0.{attn}.{proj}" for block in ("input_blocks.1.1", "output_blocks.0.1")
             for attn in ("attn1", "attn2") for proj in ("to_q", "to_v", "to_out.0")]
CONV_3X3 = "output_blocks.0.0.in_layers.2"
STEPS = 6
CONTENT_RANK, STYLE_RANK = 2, 3


@pytest.fixture(scope="module")
def shapes(tiny_sd15):
    return {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}


@pytest.fixture(scope="module")
def files(comfy_base, shapes):
    """{role: (file name, {model key: float64 ΔW})}: kohya files on twelve attention projections and a 3x3 conv; the
    content factors are scaled per layer (x0.4 .. x2.5) so that layers change hands over the run."""
    made = {}
    for role, rank, seed in (("content", CONTENT_RANK, 11), ("style", STYLE_RANK, 12)):
        tensors, deltas = build_file(shapes, ATTENTION + [CONV_3X3], "kohya", rank=rank, alpha=float(rank), seed=seed)
        if role == "content":
            for index, native in enumerate(ATTENTION):
                factor = 0.4 + 0.19 * index
                tensors["lora_unet_" + native.replace(".", "_") + ".lora_up.weight"] *= factor
                deltas[f"diffusion_model.{native}.weight"] *= factor
        name = f"csa_klora_{role}.safetensors"
        save_file(tensors, str(comfy_base / "models" / "loras" / name))
        made[role] = (name, deltas)
    zero, _ = build_file(shapes, ATTENTION, "kohya", rank=STYLE_RANK, alpha=None, seed=13)
    save_file({k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in zero.items()},
              str(comfy_base / "models" / "loras" / "csa_klora_zero.safetensors"))
    return made


def load(comfy, name, strength=1.0):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part="whole file",
                                            role="from file").args[0]


def klora(comfy, model, content, style, pattern="S* (wrapped, official default)", beta=1.275,
          other_changes="leave out (K-LoRA)"):
    return comfy["CSA_KLoRA"].execute(model=model, content=content, style=style, pattern=pattern, alpha=1.5, beta=beta,
                                      balance="trimmed mean of layer ratios (official code)",
                                      other_changes=other_changes).args


def sample(model, positive, negative, steps=STEPS):
    import nodes

    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    return nodes.common_ksampler(model, 42, steps, 3.0, "euler", "normal", positive, negative, latent)[0]["samples"]


@pytest.fixture(scope="module")
def conds(tiny_sd15):
    clip = tiny_sd15[1]
    return (clip.encode_from_tokens_scheduled(clip.tokenize("a sks dog in zkz style")),
            clip.encode_from_tokens_scheduled(clip.tokenize("")))


def record_changes(comfy_base, patched, keys):
    """Wrap each switched layer's forward (K-LoRA's) to record (key, sampler step, input, added change)."""
    import comfy.utils
    from comfy_host import pack_module

    runtime, seam = pack_module(comfy_base, "nodes.runtime_adapters"), pack_module(comfy_base, "nodes.comfy_compat")
    records = []
    for key in keys:
        module_name = key[: -len(".weight")]
        klora_forward = patched.object_patches[f"{module_name}.forward"]
        layer = comfy.utils.get_attr(patched.model, module_name)

        def recorder(x, *args, key=key, klora_forward=klora_forward, layer=layer, **kwargs):
            out = klora_forward(x, *args, **kwargs)
            base = type(layer).forward(layer, x, *args, **kwargs)
            records.append((key, seam.sampler_step(runtime.call_options()), x.detach().double(),
                            (out - base).detach().double()))
            return out
        patched.add_object_patch(f"{module_name}.forward", recorder)
    return records


@pytest.mark.parametrize("pattern,beta", [("S* (wrapped, official default)", 1.275), ("S (linear)", 0.5)])
def test_every_layer_and_step_adds_the_reference_winner(comfy, comfy_base, tiny_sd15, files, conds, pattern, beta):
    model = tiny_sd15[0]
    (content_name, content_deltas), (style_name, style_deltas) = files["content"], files["style"]
    patched, report = klora(comfy, model, load(comfy, content_name, 0.9), load(comfy, style_name, 1.1), pattern, beta)
    keys = [f"diffusion_model.{n}.weight" for n in ATTENTION]
    assert sorted(k[: -len(".forward")] + ".weight" for k in patched.object_patches) == sorted(keys)
    gamma = reference_gamma([(content_deltas[k], style_deltas[k]) for k in keys], "trimmed")
    assert f"γ {gamma:.4f}" in report and f"{CONV_3X3}.weight" in report and "not used" in report
    records = record_changes(comfy_base, patched, keys)
    sample(patched, *conds)
    winners, steps_seen = set(), set()
    for key, (step, steps), x, added in records:
        assert steps == STEPS
        winner = reference_winner(content_deltas[key], style_deltas[key], CONTENT_RANK, STYLE_RANK, gamma, step, steps,
                                  1.5, beta, pattern.startswith("S*"))
        delta, strength = (content_deltas[key], 0.9) if winner == "content" else (style_deltas[key], 1.1)
        expected = strength * x @ delta.T
        assert (added - expected).abs().max() <= 1e-5 * expected.abs().max(), (key, step, winner)
        winners.add((key, winner))
        steps_seen.add(step)
    assert steps_seen == set(range(STEPS)), "a call at every sampler step"
    switching = {key for key, w in winners if (key, "content") in winners and (key, "style") in winners}
    assert switching and len({w for _, w in winners}) == 2, "layers change hands during the run"


def test_one_adapter_zero_equals_that_adapter_alone(comfy, tiny_sd15, files, conds):
    model = tiny_sd15[0]
    content = load(comfy, files["content"][0], 0.8)
    zero = load(comfy, "csa_klora_zero.safetensors")
    alone = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=content, block_strengths="").args[0]
    expected = sample(alone, *conds)
    for ours in (klora(comfy, model, content, zero, other_changes="add both (naive sum)")[0],
                 klora(comfy, model, zero, content.replace(role="style"), other_changes="add both (naive sum)")[0]):
        got = sample(ours, *conds)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.equal(expected, sample(model, *conds)), "the content adapter changes the picture"


def test_the_input_model_is_untouched_and_leaving_out_changes_nothing_else(comfy, tiny_sd15, files, conds):
    model = tiny_sd15[0]
    before = sample(model, *conds)
    patched, _ = klora(comfy, model, load(comfy, files["content"][0]), load(comfy, files["style"][0]))
    assert not patched.patches and not model.object_patches, "leave out: no weight patch; the input keeps none"
    sample(patched, *conds)
    assert torch.equal(sample(model, *conds), before)
