"""The model zoo: shapes, the backbone/head split, cost, user factories, bad input."""

from __future__ import annotations

import pytest
import torch

from graceful_ray.errors import ModelError
from graceful_ray.models import EmbeddingClassifier, ModelSpec, build_model, model_cost


@pytest.mark.parametrize("factory,shape", [("mlp", (40,)), ("cnn1d", (40,)), ("resnet", (3, 32, 32))])
def test_zoo_models_split_backbone_and_head(factory, shape):
    model = build_model(ModelSpec(factory, shape, 7, {"embedding_dim": 16}))
    x = torch.randn(5, *shape)
    emb, logits = model.forward_features(x)
    assert emb.shape == (5, 16) and logits.shape == (5, 7)
    # The head is a plain linear map of the embedding: compatibility losses rely on it.
    torch.testing.assert_close(model.head(emb), logits)
    torch.testing.assert_close(model(x), logits)


def test_flat_features_are_reshaped_for_declared_input_shape():
    model = build_model(ModelSpec("mlp", (8, 8), 10, {}))
    assert model(torch.randn(3, 64)).shape == (3, 10)


def test_wrong_input_shape_names_both_shapes():
    model = build_model(ModelSpec("cnn1d", (40,), 10, {}))
    with pytest.raises(ModelError, match=r"\(3, 39\).*\(batch, 40\)"):
        model(torch.randn(3, 39))


def test_cost_counts_parameters_and_flops():
    model = build_model(ModelSpec("mlp", (40,), 10, {"width": 32, "depth": 1, "embedding_dim": 8}))
    cost = model_cost(model)
    assert cost.parameters == (40 * 32 + 32) + (32 * 8 + 8) + (8 * 10 + 10)
    # one multiply-add = 2 FLOPs per weight of every linear layer
    assert cost.flops_per_sample == 2 * (40 * 32 + 32 * 8 + 8 * 10)
    wide = build_model(ModelSpec("cnn1d", (40,), 10, {"channels": 64}))
    narrow = build_model(ModelSpec("cnn1d", (40,), 10, {"channels": 16}))
    assert model_cost(wide).flops_per_sample > model_cost(narrow).flops_per_sample


def user_factory(input_shape, num_classes, *, hidden=4):
    """A user's own model, plugged in by import path."""
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, hidden))
    return EmbeddingClassifier(backbone, hidden, num_classes, input_shape)


def not_a_classifier(input_shape, num_classes):
    return torch.nn.Linear(40, num_classes)


def test_user_factory_by_import_path():
    model = build_model(ModelSpec("tests.test_models:user_factory", (40,), 3, {"hidden": 6}))
    assert model.embedding_dim == 6 and model(torch.randn(2, 40)).shape == (2, 3)


@pytest.mark.parametrize("factory,match", [
    ("nope", "unknown model 'nope'"),
    ("no_such_module_xyz:f", "cannot import model module"),
    ("tests.test_models:missing", "has no attribute 'missing'"),
    ("tests.test_models:not_a_classifier", "must return an EmbeddingClassifier"),
])
def test_bad_factories_get_clear_errors(factory, match):
    with pytest.raises(ModelError, match=match):
        build_model(ModelSpec(factory, (40,), 3, {}))


def test_bad_kwargs_and_activation():
    with pytest.raises(ModelError, match="does not accept arguments"):
        build_model(ModelSpec("mlp", (40,), 3, {"bogus": 1}))
    with pytest.raises(ModelError, match="unknown activation"):
        build_model(ModelSpec("mlp", (40,), 3, {"activation": "swishy"}))


def test_spec_roundtrip():
    spec = ModelSpec("cnn1d", (40,), 10, {"channels": 8})
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ModelError):
        ModelSpec.from_dict({"factory": "mlp"})


@pytest.mark.parametrize("factory, blocks", [("resnet18", 8), ("resnet50", 16)])
def test_standard_resnets_train_on_tiny_images_in_both_memory_formats(factory, blocks):
    """ResNet-18/50 (our code): a forward/backward step on tiny images, in the
    default and in channels-last memory (the --gpu path), with the same result."""
    import torch

    from graceful_ray.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(factory, (3, 16, 16), 5, {"width": 8, "embedding_dim": 16}))
    assert len(model.backbone.stages) == blocks
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    emb, logits = model.forward_features(x)
    assert emb.shape == (4, 16) and logits.shape == (4, 5)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0  # the gradient reaches the stem
    model.eval()
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model.forward_features(x)[1]
        got = cl.forward_features(x.contiguous(memory_format=torch.channels_last))[1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_resnet18_has_the_published_size():
    from graceful_ray.models import ModelSpec, build_model

    model = build_model(ModelSpec("resnet18", (3, 224, 224), 1000))
    convs_and_bns = sum(p.numel() for n, p in model.backbone.named_parameters() if not n.startswith("proj"))
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its fc layer
    assert convs_and_bns == 11_689_512 - 513_000
