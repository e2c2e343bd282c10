"""Image to Prompt Vectors: exact injection at the text encoder's input embeddings, batches, errors."""
from __future__ import annotations

import pytest
import torch

from core.ipl import LatentMapper, save_mapper

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def node_module(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.ipl")


@pytest.fixture(scope="module")
def compat(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.comfy_compat")


def word_embeddings(clip, compat, ipl, words: str) -> torch.Tensor:
    """The token embeddings of ``words`` (their real input vectors), (n, 768)."""
    special = compat.special_token_ids(clip)
    ids = [t for t in compat.token_ids(clip, words) if t not in special]
    encoder = ipl.text_encoders(clip)["l"]
    return encoder.transformer.get_input_embeddings()(torch.tensor([ids]), out_dtype=torch.float32)[0]


def test_inserted_vectors_encode_exactly_like_the_words_they_are(comfy, tiny_sd15, compat, node_module):
    clip = tiny_sd15[1]
    vectors = word_embeddings(clip, compat, node_module, "red car")
    assert vectors.shape[0] == 2
    tokens = node_module.insert_prompt_vectors(clip, "a {} photo of a dog", node_module.MARKER, {"l": vectors})
    chunk = tokens["l"][0]
    assert len(chunk) == 77 and torch.is_tensor(chunk[2][0]) and torch.is_tensor(chunk[3][0])
    reference = clip.tokenize("a red car photo of a dog")["l"][0]
    assert [e[0] for i, e in enumerate(chunk) if i not in (2, 3)] == [e[0] for i, e in enumerate(reference) if i not in (2, 3)]
    ours = node_module.encode_tokens(clip, tokens)[0]
    expected = clip.encode_from_tokens(clip.tokenize("a red car photo of a dog"))
    assert torch.allclose(ours, expected, atol=1e-4)


def test_more_vectors_than_marker_tokens_keep_77_tokens_and_the_rest_unchanged(comfy, tiny_sd15, compat, node_module):
    clip = tiny_sd15[1]
    vectors = word_embeddings(clip, compat, node_module, "a very red fast car")
    tokens = node_module.insert_prompt_vectors(clip, "{} photo", node_module.MARKER, {"l": vectors})["l"][0]
    assert len(tokens) == 77 and all(torch.is_tensor(tokens[i][0]) for i in range(1, 6))
    ours = node_module.encode_tokens(clip, {"l": [tokens]})[0]
    assert torch.allclose(ours, clip.encode_from_tokens(clip.tokenize("a very red fast car photo")), atol=1e-4)
    with pytest.raises(ValueError, match="too long to take 80 prompt vectors"):
        node_module.insert_prompt_vectors(clip, "{} photo", node_module.MARKER, {"l": torch.zeros(80, 768)})


@pytest.fixture(scope="module")
def mapper_name(comfy_base):
    torch.manual_seed(11)
    mapper = LatentMapper(in_dim=768, n_ctx=4, token_dims={"l": 768})
    save_mapper(mapper, comfy_base / "models" / "prompt_mappers" / "host_mapper.safetensors", overwrite=True)
    return "host_mapper.safetensors"


def test_node_maps_each_image_of_a_batch_to_its_own_conditioning(comfy, tiny_sd15, tiny_clip_vision, mapper_name):
    clip = tiny_sd15[1]
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    node = comfy["CSA_ImageToPromptVectors"]
    ((cond, extras),) = node.execute(image=images, clip_vision=tiny_clip_vision, mapper_name=mapper_name, clip=clip,
                                       template="a {} photo of a dog").args[0]
    assert cond.shape == (2, 77, 768)
    assert not torch.allclose(cond[0], cond[1])
    for b in range(2):
        ((single, _),) = node.execute(image=images[b:b + 1], clip_vision=tiny_clip_vision, mapper_name=mapper_name,
                                      clip=clip, template="a {} photo of a dog").args[0]
        assert torch.allclose(single[0], cond[b], atol=1e-5)
    plain = clip.encode_from_tokens(clip.tokenize("a photo of a dog"))
    assert torch.allclose(cond[0, 0], plain[0, 0], atol=1e-5)  # the start token is untouched


def test_mismatches_are_named(comfy, tiny_sd15, tiny_clip_vision, comfy_base, mapper_name):
    torch.manual_seed(12)
    save_mapper(LatentMapper(in_dim=1024, n_ctx=4, token_dims={"l": 768}),
                comfy_base / "models" / "prompt_mappers" / "host_vit_h_mapper.safetensors", overwrite=True)
    images = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="takes 1024-wide image embeddings, this CLIP_VISION gives 768"):
        comfy["CSA_ImageToPromptVectors"].execute(image=images, clip_vision=tiny_clip_vision,
                                                  mapper_name="host_vit_h_mapper.safetensors", clip=tiny_sd15[1],
                                                  template="a {} photo")
    for template, count in (("a photo", 0), ("a {} photo of {}", 2)):
        with pytest.raises(ValueError, match=f"must have exactly one {{}} placeholder for the prompt vectors; it has {count}"):
            comfy["CSA_ImageToPromptVectors"].execute(image=images, clip_vision=tiny_clip_vision,
                                                      mapper_name=mapper_name, clip=tiny_sd15[1], template=template)
