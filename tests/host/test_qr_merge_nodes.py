"""QR Merge and Convert to QR-LoRA on the tiny SD1.5 model, against dense float64 references."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from support.lora_files import build_file
from support.weights import checkpoint_weights, patched_weights

pytestmark = pytest.mark.host

MODULES = [f"{block}.transformer_blocks.0.{attn}.{proj}" for block in ("input_blocks.1.1", "output_blocks.1.1")
           for attn in ("attn1", "attn2") for proj in ("to_q", "to_v")] + ["input_blocks.1.1.proj_in",
                                                                          "input_blocks.1.0.in_layers.2"]


@pytest.fixture(scope="module")
def files(comfy_base, tiny_sd15):
    shapes = {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}
    content_t, content_d = build_file(shapes, MODULES, "kohya", rank=4, alpha=2.0, seed=101)
    style_t, style_d = build_file(shapes, MODULES, "peft", rank=8, alpha=None, seed=102)
    save_file(content_t, str(comfy_base / "models" / "loras" / "qr_content.safetensors"))
    save_file(style_t, str(comfy_base / "models" / "loras" / "qr_style.safetensors"))
    return content_d, style_d


def load(comfy, name, strength):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part="whole file",
                                            role="from file").args[0]


def qr_merge(comfy, model, content, style, lam_c, lam_s, interference="off", **form):
    return comfy["CSA_QRMerge"].execute(model=model, content=content, style=style, lambda_content=lam_c,
                                        lambda_style=lam_s, interference=interference, **form).args


@pytest.mark.parametrize("form, path", [({}, "concatenated"),
                                        ({"merged_form": "joint orthonormal basis (compact)"}, "joint-basis")])
def test_merge_of_ordinary_loras_equals_weighted_sum(comfy, tiny_sd15, files, form, path):
    model, _, _ = tiny_sd15
    content_d, style_d = files
    content, style = load(comfy, "qr_content.safetensors", 1.0), load(comfy, "qr_style.safetensors", 0.5)
    patched, merged, report = qr_merge(comfy, model, content, style, 0.7, 1.3, **form)
    assert report.splitlines()[0] == f"{len(MODULES)} layers: {len(MODULES)} {path}"
    assert merged.ranks == [12] and merged.method == "qr-merge"
    base = checkpoint_weights(content_d)
    got = patched_weights(patched, content_d)
    for key in content_d:
        reference = base[key].double() + 0.7 * content_d[key] + 1.3 * 0.5 * style_d[key]
        assert torch.allclose(got[key].double(), reference, atol=2e-5, rtol=1e-5), key
    assert model.patches == {}


def test_zero_strengths_return_the_model_untouched(comfy, tiny_sd15, files):
    model, _, _ = tiny_sd15
    content, style = load(comfy, "qr_content.safetensors", 1.0), load(comfy, "qr_style.safetensors", 1.0)
    patched, _, report = qr_merge(comfy, model, content, style, 0.0, 0.0)
    assert patched is model and model.patches == {} and "model unchanged" in report


def exact_top_r_error(matrix: torch.Tensor, rank: int) -> float:
    """The smallest ||W - W_r||_F / ||W||_F over rank-r W_r (Eckart-Young), from the full SVD."""
    s = torch.linalg.svdvals(matrix)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def test_converted_adapters_share_q_and_merge_by_the_official_formula(comfy, tiny_sd15, files, comfy_base):
    model, clip, _ = tiny_sd15
    content_d, style_d = files
    convert = comfy["CSA_ConvertToQRLoRA"]
    content, c_report = convert.execute(model=model, adapter=load(comfy, "qr_content.safetensors", 1.0), rank=16).args
    style, _ = convert.execute(model=model, adapter=load(comfy, "qr_style.safetensors", 1.0), rank=16).args
    assert content.method == "qr-lora" and len(c_report.splitlines()) == len(MODULES) + 1
    assert f"{len(MODULES)} of {len(MODULES)} modules mapped" in c_report.splitlines()[-1]
    patched, merged, report = qr_merge(comfy, model, content, style, 0.6, 1.1)
    assert report.splitlines()[0] == f"{len(MODULES)} layers: {len(MODULES)} shared-q" and merged.ranks == [16]
    assert report.count(f"{len(MODULES)} of {len(MODULES)} modules mapped") == 2
    fit_errors = {line.split(":")[0]: float(line.rsplit(" ", 1)[1]) for line in c_report.splitlines()[:-1]}
    base = checkpoint_weights(content_d)
    got = patched_weights(patched, content_d)
    for key in content_d:
        name = key[:-len(".weight")]
        q = content.modules[name].up.flatten(1).double()
        assert torch.equal(style.modules[name].up, content.modules[name].up), "one base, one Q"
        assert torch.allclose(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-5)
        # Q spans a near-best rank-16 subspace of W (randomized SVD), and the report says how near
        shape = base[key].shape
        matrix = base[key].reshape(shape[0], -1).double()
        fit_error = float(torch.linalg.matrix_norm(matrix - q @ (q.T @ matrix)) / torch.linalg.matrix_norm(matrix))
        assert fit_errors[key] == pytest.approx(fit_error, abs=1e-4), key
        assert exact_top_r_error(matrix, 16) <= fit_error + 1e-6 <= exact_top_r_error(matrix, 16) * 1.05, key
        delta_rc = q.T @ content_d[key].reshape(shape[0], -1)
        delta_rs = q.T @ style_d[key].reshape(shape[0], -1)
        official = base[key].double() + (q @ (0.6 * delta_rc + 1.1 * delta_rs)).reshape(shape)
        assert torch.allclose(got[key].double(), official, atol=5e-5, rtol=1e-4), key
    saved = comfy["CSA_SaveAdapter"].execute(adapter=merged, filename="qr_merged", subfolder="", key_form="comfy",
                                             overwrite=False).args[0]
    assert saved.endswith("qr_merged.safetensors")
    stock = patched_weights(comfy["LoraLoader"]().load_lora(model, clip, "qr_merged.safetensors", 1.0, 0.0)[0], content_d)
    for key in content_d:
        assert torch.equal(stock[key], got[key]), key


def test_interference_option_changes_only_the_style_part(comfy, tiny_sd15, files):
    model, _, _ = tiny_sd15
    content, style = load(comfy, "qr_content.safetensors", 1.0), load(comfy, "qr_style.safetensors", 1.0)
    plain = patched_weights(qr_merge(comfy, model, content, style, 1.0, 1.0)[0], files[0])
    reduced = patched_weights(qr_merge(comfy, model, content, style, 1.0, 1.0,
                                       "style without content directions")[0], files[0])
    content_only = patched_weights(qr_merge(comfy, model, content, style, 1.0, 0.0,
                                            "style without content directions")[0], files[0])
    key = next(iter(files[0]))
    assert not torch.allclose(plain[key], reduced[key])
    assert torch.allclose(content_only[key].double(),
                          checkpoint_weights([key])[key].double() + files[0][key], atol=2e-5)


def test_conversion_reads_the_base_weights_even_while_a_patched_clone_is_loaded(comfy, tiny_sd15, files):
    """ComfyUI writes a loaded clone's LoRA patches into the shared weights; Q must still come from the base."""
    import comfy.model_management as mm

    model, _, _ = tiny_sd15
    convert = comfy["CSA_ConvertToQRLoRA"]
    before = convert.execute(model=model, adapter=load(comfy, "qr_content.safetensors", 1.0), rank=8).args[0]
    patched = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=load(comfy, "qr_style.safetensors", 3.0),
                                                block_strengths="").args[0]
    mm.load_model_gpu(patched)
    try:
        key = next(iter(files[0]))
        assert not torch.equal(model.model.state_dict()[key], patched.backup[key].weight), "the patch is in place"
        during = convert.execute(model=model, adapter=load(comfy, "qr_content.safetensors", 1.0), rank=8).args[0]
    finally:
        mm.unload_all_models()
    for name, factors in before.modules.items():
        assert torch.equal(factors.up, during.modules[name].up) and torch.equal(factors.down, during.modules[name].down)


@pytest.mark.parametrize("node", ["merge", "convert"])
def test_cancel_stops_merging_and_conversion_and_leaves_the_model_untouched(comfy, tiny_sd15, files, node):
    import comfy.model_management as mm

    model, _, _ = tiny_sd15
    patches_before = {k: len(v) for k, v in model.patches.items()}
    content, style = load(comfy, "qr_content.safetensors", 1.0), load(comfy, "qr_style.safetensors", 1.0)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            if node == "merge":
                qr_merge(comfy, model, content, style, 1.0, 1.0)
            else:
                comfy["CSA_ConvertToQRLoRA"].execute(model=model, adapter=content, rank=8)
    finally:
        mm.interrupt_current_processing(False)
    assert {k: len(v) for k, v in model.patches.items()} == patches_before
    assert qr_merge(comfy, model, content, style, 1.0, 1.0)[2]  # the next run works


@pytest.mark.parametrize("spaces, shown, hidden", [("off", ["overlap report off"], ["out max", "in max"]),
                                                   ("output spaces", ["out max"], ["in max", "report off"]),
                                                   ("output and input spaces", ["out max", "in max"], ["report off"])])
def test_overlap_report_shows_the_asked_spaces_and_never_changes_the_merge(comfy, tiny_sd15, files, spaces, shown,
                                                                         hidden):
    model, _, _ = tiny_sd15
    content, style = load(comfy, "qr_content.safetensors", 1.0), load(comfy, "qr_style.safetensors", 0.8)
    _, reference, _ = qr_merge(comfy, model, content, style, 0.7, 1.3)
    _, merged, report = qr_merge(comfy, model, content, style, 0.7, 1.3, overlap_report=spaces)
    for text in shown:
        assert text in report, (spaces, report)
    for text in hidden:
        assert text not in report, (spaces, report)
    lines = [line for line in report.splitlines() if "overlap out" in line or "overlap in" in line]
    assert len(lines) == (0 if spaces == "off" else len(MODULES))
    assert merged.module_names == reference.module_names
    for name in merged.module_names:
        assert torch.equal(merged.modules[name].up, reference.modules[name].up)
        assert torch.equal(merged.modules[name].down, reference.modules[name].down)


@pytest.mark.parametrize("shape", [(24, 40), (24, 16, 3, 3)], ids=["linear", "conv"])
@pytest.mark.parametrize("strength, alpha", [(1.0, None), (1.0, 6.0), (0.7, None), (1.0, 3.0)],
                         ids=["scale 1, no alpha", "alpha = rank", "strength 0.7", "alpha / rank 0.5"])
def test_the_packs_lora_patch_is_comfyuis_bit_for_bit(comfy, comfy_base, shape, strength, alpha):
    """LowRankWeightAdapter skips LoRAAdapter's multiply by a scale of exactly 1 (issue 21) and is otherwise
    LoRAAdapter: the patched weight is identical in every case, fp16 weights included."""
    import comfy.lora
    import comfy.weight_adapter
    from comfy_host import pack_module

    compat = pack_module(comfy_base, "nodes.comfy_compat")
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(shape[0], 6, generator=g), torch.randn(6, *shape[1:], generator=g)
    tensors = {"m.lora_up.weight": up, "m.lora_down.weight": down}
    ours = compat.lora_weight_adapter("m", up, down, alpha)  # alpha as comfy.lora.load_lora passes it: a float
    stock = comfy.weight_adapter.LoRAAdapter.load("m", tensors, alpha, None)
    assert isinstance(ours, comfy.weight_adapter.LoRAAdapter) and type(ours) is not type(stock)
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(shape, generator=g).to(dtype)
        got = comfy.lora.calculate_weight([(strength, ours, 1.0, None, None)], weight.clone(), "m")
        want = comfy.lora.calculate_weight([(strength, stock, 1.0, None, None)], weight.clone(), "m")
        assert torch.equal(got, want) and not torch.equal(got, weight), dtype
