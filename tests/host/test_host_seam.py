"""The seam's probes for newer ComfyUI releases (docs/comfyui-host-audit.md): each branch that can run on this host,
on real ComfyUI objects; the keyword probe on functions of both signatures."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def seam(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.comfy_compat")


def test_optional_keywords_reach_only_functions_that_take_them(seam):
    def old(model, samples):
        return ("old", model, samples)

    def new(model, samples, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        return ("new", downscale_ratio_spacial, downscale_ratio_temporal)

    def open_ended(model, samples, **kwargs):
        return sorted(kwargs)

    extra = {"downscale_ratio_spacial": 8, "downscale_ratio_temporal": 4}
    assert seam.call_with_supported(old, 1, 2, **extra) == ("old", 1, 2)
    assert seam.call_with_supported(new, 1, 2, **extra) == ("new", 8, 4)
    assert seam.call_with_supported(open_ended, 1, 2, **extra) == sorted(extra)


def test_empty_latents_are_fixed_as_this_comfyui_fixes_them(seam, tiny_sd15):
    import comfy.sample

    model = tiny_sd15[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8), "downscale_ratio_spacial": 8}
    assert torch.equal(seam.empty_latent_fixed(model, latent), comfy.sample.fix_empty_latent_channels(model,
                                                                                                      latent["samples"]))


def test_a_static_patcher_trains_as_it_is(seam, tiny_sd15):
    """0.3.75 on the CPU hands nodes static patchers (no is_dynamic): training uses the model it was given. The
    dynamic branch (newer releases on CUDA with comfy-aimdo) cannot run on this machine."""
    model = tiny_sd15[0]
    assert not hasattr(model, "is_dynamic") and seam.static_patcher(model) is model
