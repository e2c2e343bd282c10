"""Score Content / Style / Prompt on ComfyUI's own encoder classes (tiny, random), against a hand computation."""
from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import comfy_host

sys.path.insert(0, str(comfy_host.REPO_ROOT / "bench"))
from score_folder import tiny_encoder  # noqa: E402  (bench/score_folder.py: the same builder its --smoke uses)

pytestmark = pytest.mark.host

# What each encoder is documented to expect (nodes/scoring.py): ImageNet statistics for DINOv2, CLIP's for CLIP.
DINO_MEAN, DINO_STD, DINO_SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 518
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def encoders(comfy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    return {"dinov2": tiny_encoder("dinov2", folder, 1), "clip": tiny_encoder("clip", folder, 2),
            "siglip": tiny_encoder("siglip", folder, 3), "clip_512": tiny_encoder("clip", folder, 4, projection_dim=512)}


def pictures(count, height, width, seed):
    """Smooth random pictures (not noise), so resizing matters but stays well defined."""
    low = torch.rand(count, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear").movedim(1, -1).clamp(0, 1)


def hand_pixels(image, size, mean, std):
    """Shorter side to ``size`` (bicubic, antialiased), centre crop, 8-bit levels, normalised: (1, 3, size, size)."""
    x = image.movedim(-1, 0)[None].float()
    scale = size / min(x.shape[2], x.shape[3])
    x = torch.nn.functional.interpolate(x, size=(round(x.shape[2] * scale), round(x.shape[3] * scale)), mode="bicubic",
                                        antialias=True)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = (x[:, :, top:top + size, left:left + size] * 255).clamp(0, 255).round() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def hand_embedding(encoder, kind, image):
    """DINOv2: the CLS token of the last hidden state (after the final norm). CLIP: post-layernorm CLS, projected."""
    with torch.no_grad():
        if kind == "dinov2":
            return encoder.model(pixel_values=hand_pixels(image, DINO_SIZE, DINO_MEAN, DINO_STD))[0][0, 0].double()
        vision = encoder.model.vision_model
        hidden = vision(pixel_values=hand_pixels(image, encoder.image_size, CLIP_MEAN, CLIP_STD))[0]
        return encoder.model.visual_projection(vision.post_layernorm(hidden[:, 0]))[0].double()


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def hand_reference_scores(encoder, kind, images, references):
    refs = [hand_embedding(encoder, kind, r) for r in references]
    return [np.mean([cos(hand_embedding(encoder, kind, image), r) for r in refs]) for image in images]


def hand_text_feature(clip, text):
    """ComfyUI's stock encode (pooled EOS after the final norm, unprojected), times the text projection."""
    pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled="unprojected")[1]
    projection = clip.cond_stage_model.clip_l.transformer.text_projection.weight.float()
    return (pooled.float() @ projection.T)[0].double()


def score(comfy, **inputs):
    return comfy["CSA_ScoreContentStylePrompt"].execute(**inputs).args


def test_scores_equal_a_hand_computation_with_mixed_sizes(comfy, encoders, clip_with_projection):
    images, content, style = pictures(2, 48, 64, 1), pictures(2, 80, 80, 2), pictures(1, 30, 100, 3)
    prompt = "a striped circle"
    out = score(comfy, images=images, content_images=content, content_encoder=encoders["dinov2"], style_images=style,
                style_encoder=encoders["clip"], prompt=prompt, clip=clip_with_projection)
    means, per_image, table, table_image = out[:3], out[3:6], out[6], out[7]
    expected = {
        "content": hand_reference_scores(encoders["dinov2"], "dinov2", images, content),
        "style": hand_reference_scores(encoders["clip"], "clip", images, style),
        "prompt": [cos(hand_embedding(encoders["clip"], "clip", i), hand_text_feature(clip_with_projection, prompt))
                   for i in images],
    }
    for (metric, values), mean, got in zip(expected.items(), means, per_image):
        assert np.allclose(got, values, atol=1e-5, rtol=0), metric
        assert mean == pytest.approx(np.mean(values), abs=1e-5), metric
        assert len(set(np.round(got, 6))) == 2, f"{metric}: both images score the same, the test cannot tell them apart"
    assert "518 px" in table and "mean (0.485, 0.456, 0.406)" in table and "to 32 px" in table
    assert table_image.shape[0] == 1 and table_image.shape[-1] == 3 and float(table_image.std()) > 0.05


def test_an_image_scored_against_itself_gives_one(comfy, encoders):
    image = pictures(1, 70, 50, 4)
    content, style, prompt = score(comfy, images=image, content_images=image, content_encoder=encoders["dinov2"],
                                   style_images=image, style_encoder=encoders["clip"])[:3]
    assert content == pytest.approx(1.0, abs=1e-6) and style == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(prompt)


def test_a_list_of_batches_of_different_sizes_scores_like_each_batch_alone(comfy, comfy_base, encoders):
    scoring = comfy_host.pack_module(comfy_base, "nodes.scoring")
    references = [pictures(1, 40, 40, 5), pictures(2, 64, 30, 6)]
    scorer = scoring.build_scorer(style_images=references, style_encoder=encoders["clip"])
    together = scorer.score([pictures(1, 50, 50, 7), pictures(1, 20, 90, 8)])["style"]
    alone = torch.cat([scorer.score(pictures(1, 50, 50, 7))["style"], scorer.score(pictures(1, 20, 90, 8))["style"]])
    assert torch.allclose(together, alone, atol=1e-12)
    expected = hand_reference_scores(encoders["clip"], "clip", [pictures(1, 50, 50, 7)[0]],
                                     [*references[0], *references[1]])
    assert float(together[0]) == pytest.approx(expected[0], abs=1e-5)


def error_of(comfy, **inputs) -> str:
    with pytest.raises(ValueError) as raised:
        score(comfy, **inputs)
    return str(raised.value)


def test_wrong_kinds_missing_projection_and_empty_references_name_the_input(comfy, encoders, tiny_sd15,
                                                                             clip_with_projection):
    image, dino, clip_vision = pictures(1, 32, 32, 9), encoders["dinov2"], encoders["clip"]
    cases = {
        "content_encoder: this CLIP_VISION is a CLIP ViT model; the content score is the DINOv2 cosine":
            dict(content_images=image, content_encoder=clip_vision),
        "style_encoder: this CLIP_VISION is a DINOv2 model; the style and prompt scores are CLIP cosines":
            dict(style_images=image, style_encoder=dino),
        "style_encoder: this CLIP_VISION is a SigLIP model": dict(style_images=image, style_encoder=encoders["siglip"]),
        "clip: its text encoder has no text projection (SD1.5 checkpoints carry none)":
            dict(style_encoder=clip_vision, prompt="a dog", clip=tiny_sd15[1]),
        "clip: its CLIP text encoders project to {'l': 768}, the style_encoder's image embeddings are 512 wide":
            dict(style_encoder=encoders["clip_512"], prompt="a dog", clip=clip_with_projection),
        "content_images: the image batch is empty (shape (0, 32, 32, 3))":
            dict(content_images=image[:0], content_encoder=dino),
        "style_images: the image batch is empty": dict(style_images=[], style_encoder=clip_vision),
        "content_encoder: connect a DINOv2 CLIP_VISION": dict(content_images=image),
        "content_images: connect the content reference images": dict(content_encoder=dino),
        "style_images: connect the style reference images": dict(style_encoder=clip_vision),
        "clip: the prompt score needs a CLIP text encoder": dict(style_encoder=clip_vision, prompt="a dog"),
        "prompt: empty": dict(style_images=image, style_encoder=clip_vision, clip=clip_with_projection),
        "style_encoder: the prompt score compares CLIP image and text features":
            dict(prompt="a dog", clip=clip_with_projection),
        "nothing to score": {},
    }
    for message, inputs in cases.items():
        assert error_of(comfy, images=image, **inputs).startswith(message), message
    assert error_of(comfy, images=image[:0], style_images=image, style_encoder=clip_vision).startswith("images: ")


def test_score_folder_smoke_runs_in_a_subprocess():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(comfy_host.REPO_ROOT / "bench" / "score_folder.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke ok" in result.stdout and "image_2.png" in result.stdout
    assert time.perf_counter() - start < 120
