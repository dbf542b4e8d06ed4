"""scratchvit.attention_maps: per-head maps and the rollout read the attention the model really used."""
import numpy
import pytest

from scratchvit import ViT
from scratchvit.attention_maps import attention_rollout, head_maps, inspect, rollout_from_attentions
from scratchvit.backend import to_host


def small_model(backend, dropout=0.0):
    model = ViT(image_size=8, patch_size=2, num_classes=5, dim=8, depth=3, heads=2, mlp_dim=16, dropout=dropout,
                dtype="float64", seed=4)
    return model.to(backend)


def images_for(backend, count=3):
    return backend.asarray(numpy.random.default_rng(1).standard_normal((count, 1, 8, 8)))


def test_head_maps_are_the_cls_rows_of_each_layers_attention(backend):
    model = small_model(backend)
    images = images_for(backend)
    result = inspect(model, images)
    assert result["heads"].shape == (3, 3, 2, 4, 4)           # (B, layers, heads, grid, grid)
    for layer, block in enumerate(model.blocks):
        attention = to_host(block.attn.attn)                   # (B, H, T, T) of the same forward
        numpy.testing.assert_allclose(result["heads"][:, layer].reshape(3, 2, 16), attention[:, :, 0, 1:], rtol=1e-12)
        # what the CLS token does not take from itself, it takes from the patches
        numpy.testing.assert_allclose(result["heads"][:, layer].sum(axis=(-1, -2)), 1 - attention[:, :, 0, 0], rtol=1e-12)
    numpy.testing.assert_allclose(head_maps(model, images), result["heads"])


def test_rollout_matches_the_formula_written_out(backend):
    model = small_model(backend)
    images = images_for(backend)
    rollout, predictions = attention_rollout(model, images)
    expected = None
    for block in model.blocks:
        attention = to_host(block.attn.attn).mean(axis=1) + numpy.eye(17)
        attention /= attention.sum(axis=-1, keepdims=True)
        expected = attention if expected is None else attention @ expected
    numpy.testing.assert_allclose(rollout, expected[:, 0, 1:].reshape(3, 4, 4), rtol=1e-12)
    numpy.testing.assert_array_equal(predictions, to_host(model.forward(images)).argmax(axis=1))


def test_rollout_of_uniform_attention_is_uniform_over_the_patches():
    tokens = 5
    uniform = numpy.full((2, 3, tokens, tokens), 1.0 / tokens)
    rollout = rollout_from_attentions([uniform, uniform])
    assert rollout.shape == (2, 2, 2)
    numpy.testing.assert_allclose(rollout, numpy.full((2, 2, 2), rollout[0, 0, 0]))


def test_probabilities_are_the_softmax_of_the_logits_and_the_mode_is_restored(backend):
    model = small_model(backend, dropout=0.5)
    model.train()
    result = inspect(model, images_for(backend))
    assert model.training
    logits = result["logits"]
    expected = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    numpy.testing.assert_allclose(result["probabilities"], expected / expected.sum(axis=1, keepdims=True), rtol=1e-12)
    # eval mode inside: dropout off, so the same images give the same maps twice
    numpy.testing.assert_array_equal(inspect(model, images_for(backend))["heads"], result["heads"])


def test_a_failing_forward_still_restores_the_mode():
    model = ViT(image_size=8, patch_size=2, num_classes=5, dim=8, depth=1, heads=2, mlp_dim=16)
    model.train()
    with pytest.raises(ValueError):
        inspect(model, numpy.zeros((1, 1, 6, 6), dtype=numpy.float32))
    assert model.training
