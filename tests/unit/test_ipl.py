"""core.ipl: mapper shapes, save/load, and the losses against hand-computed references."""
import math

import pytest
import torch
import torch.nn.functional as F

from core.adapter_file import AdapterFileError, write_safetensors
from core.ipl import (LatentMapper, contrastive_loss, directional_loss, domain_regularizer, load_mapper,
                      save_mapper)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_mapper_shapes_and_split():
    torch.manual_seed(0)
    mapper = LatentMapper(in_dim=32, n_ctx=4, token_dims={"l": 12, "g": 20}, hidden=16)
    vectors = mapper(rand(3, 32))
    assert vectors.shape == (3, 4, 32)
    parts = mapper.split(vectors)
    assert list(parts) == ["l", "g"] and parts["l"].shape == (3, 4, 12) and parts["g"].shape == (3, 4, 20)
    assert torch.equal(torch.cat([parts["l"], parts["g"]], -1), vectors)
    with pytest.raises(ValueError, match=r"\(batch, 32\) image embeddings"):
        mapper(rand(3, 31))


def test_equal_linear_uses_the_learning_rate_multiplier():
    torch.manual_seed(1)
    mapper = LatentMapper(in_dim=8, n_ctx=1, token_dims={"l": 4}, hidden=8, layers=1, lr_mul=0.01)
    layer = mapper.net[1]
    x = rand(2, 8)
    expected = F.leaky_relu(x @ (layer.weight * 0.01 / math.sqrt(8)).T + layer.bias * 0.01, 0.2) * math.sqrt(2)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(2)
    mapper = LatentMapper(in_dim=16, n_ctx=2, token_dims={"l": 8}, hidden=8)
    path = save_mapper(mapper, tmp_path / "m.safetensors", {"csa.source_label": "dog"})
    loaded, metadata = load_mapper(path)
    assert metadata["csa.source_label"] == "dog" and loaded.config() == mapper.config()
    x = rand(2, 16)
    assert torch.equal(loaded(x), mapper(x))
    write_safetensors(tmp_path / "not.safetensors", {"a.lora_up.weight": torch.zeros(2, 2)}, {})
    with pytest.raises(AdapterFileError, match="not.safetensors: not a prompt mapper file"):
        load_mapper(tmp_path / "not.safetensors")


def test_contrastive_loss_matches_a_hand_computed_reference():
    image, text = rand(3, 5, seed=3), rand(3, 5, seed=4)
    i = image / image.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    logits = 100.0 * i @ t.T
    reference = 0.0
    for row in range(3):  # image -> text and text -> image cross-entropies by hand
        reference += -torch.log_softmax(logits[row], 0)[row] / 6 + -torch.log_softmax(logits[:, row], 0)[row] / 6
    assert torch.allclose(contrastive_loss(image, text), reference, atol=1e-5)


def test_domain_regularizer_and_directional_loss_by_hand():
    target, templates = rand(2, 4, seed=5), rand(3, 4, seed=6)
    anchor = torch.stack([t / t.norm() for t in templates]).mean(0)
    anchor = anchor / anchor.norm()
    expected = sum(1 - (row / row.norm()) @ anchor for row in target) / 2
    assert torch.allclose(domain_regularizer(target, templates), expected, atol=1e-6)
    src_i, tgt_i, src_t, tgt_t = (rand(2, 4, seed=s) for s in (7, 8, 9, 10))
    cosines = [torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(tgt_i - src_i, tgt_t - src_t)]
    assert torch.allclose(directional_loss(src_i, tgt_i, src_t, tgt_t), 1 - torch.stack(cosines).mean(), atol=1e-6)
    same = directional_loss(src_i, src_i + (tgt_t - src_t) * 3, src_t, tgt_t)
    assert same.abs() < 1e-6


def test_stage_one_training_lowers_the_loss_on_a_synthetic_set():
    """A frozen random 'text encoder' (mean of vectors + label embedding, projected): the mapper must learn to
    make each image's source prompt match that image."""
    from core.ipl import train_mapper

    torch.manual_seed(0)
    embeds = rand(8, 16, seed=20)
    projection = rand(12, 16, seed=21)
    labels = {"dog": rand(12, seed=22), "cat": rand(12, seed=23)}

    def encode(vectors, label):
        return (vectors.mean(1) + labels[label]) @ projection

    mapper = LatentMapper(in_dim=16, n_ctx=2, token_dims={"l": 12}, hidden=32)
    templates = torch.stack([(labels["cat"] + rand(12, seed=30 + i) * 0.1) @ projection for i in range(3)])
    losses = train_mapper(mapper, embeds, encode, "dog", "cat", templates, iterations=150, lr=0.05, batch_size=8, seed=1)
    assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    with pytest.raises(ValueError, match="at least 2 source images"):
        train_mapper(mapper, embeds[:1], encode, "dog", "cat", templates, 1, 0.1, 4, 0)
