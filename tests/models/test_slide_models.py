"""Slide-level models: architecture as specified, shapes, gradients, invariances, losses."""

from __future__ import annotations

import math

import pytest
import torch

from nic_models.dihedral import dihedral, dihedral_inverse
from nic_models.errors import NicError
from nic_models.slide_models import (
    cox_loss,
    create_slide_model,
    get_slide_model_spec,
    list_slide_models,
    predict_dihedral,
    register_slide_model,
    task_loss,
)
from nic_models.slide_models.abmil import GatedAttentionMIL
from nic_models.slide_models.nic_cnn import NicCNN, grad_cam
from nic_models.slide_models.pooling import PoolingLinear

torch.set_num_threads(1)


def test_nic_cnn_architecture_follows_tellez_2019():
    model = NicCNN(in_channels=129, n_outputs=1)
    assert len(model.blocks) == 8
    strides = [b.depthwise.stride[0] for b in model.blocks]
    assert strides == [2] * 6 + [1] * 2
    for block in model.blocks:
        assert block.depthwise.kernel_size == (3, 3)
        assert block.depthwise.groups == block.depthwise.in_channels  # depthwise
        assert block.pointwise.kernel_size == (1, 1) and block.pointwise.out_channels == 128
        assert isinstance(block.bn, torch.nn.BatchNorm2d)
        assert isinstance(block.act, torch.nn.LeakyReLU)
        assert isinstance(block.drop, torch.nn.Dropout2d)  # feature-wise dropout
    assert model.head[0].out_features == 128  # dense layer of 128


@pytest.mark.parametrize("size,n_out", [(32, 1), (64, 3), (20, 2)])
def test_nic_cnn_output_shape(size, n_out):
    model = NicCNN(17, n_out, width=16).eval()
    assert model(torch.randn(2, 17, size, size)).shape == (2, n_out)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    models = {
        "nic-cnn": (NicCNN(9, 1, width=16, dropout=0.0), torch.randn(4, 9, 32, 32)),
        "abmil": (GatedAttentionMIL(8, 1, dropout=0.0), torch.randn(50, 8)),
        "mean": (PoolingLinear(8, 1, "mean"), torch.randn(50, 8)),
    }
    for name, (model, x) in models.items():
        out = model(x)
        task_loss("binary", out, torch.ones(out.shape[0])).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.any(p.grad != 0), f"{name}: no gradient for {pname}"


def test_dihedral_group_has_eight_distinct_invertible_elements():
    x = torch.arange(16.0).reshape(1, 4, 4)
    images = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(images) == 8
    for k in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)


def test_rotation_flip_averaged_prediction_is_invariant():
    torch.manual_seed(1)
    model = NicCNN(5, 3, width=16, dropout=0.0)
    # a few steps towards an orientation-dependent target (the mean of the top-left corner),
    # so that single orientations really disagree
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        xb = torch.randn(8, 5, 32, 32)
        loss = (model(xb)[:, 0] - 10 * xb[:, 0, :8, :8].mean((1, 2))).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        reference = predict_dihedral(model, x, "multiclass")
        assert torch.allclose(reference.sum(1), torch.ones(2))
        for k in range(1, 8):
            assert torch.allclose(predict_dihedral(model, dihedral(x, k), "multiclass"), reference, atol=1e-5)
        # a single orientation is not invariant: the averaging is what makes it so
        single = [torch.softmax(model(dihedral(x, k)), -1) for k in range(8)]
        assert max((s - single[0]).abs().max() for s in single) > 1e-3


def test_grad_cam_is_rotation_equivariant():
    torch.manual_seed(2)
    model = NicCNN(4, 1, width=8).eval()
    x = torch.randn(4, 16, 16)
    cam = grad_cam(model, x, layer=1)
    assert cam.shape == (16, 16) and torch.all(cam >= 0)
    rotated = grad_cam(model, dihedral(x, 1), layer=1)
    assert torch.allclose(rotated, dihedral(cam, 1), atol=1e-4)


def test_attention_is_a_distribution_and_pooling_is_permutation_invariant():
    torch.manual_seed(3)
    model = GatedAttentionMIL(6, 2).eval()
    bag = torch.randn(40, 6)
    _, attention = model.attention(bag)
    assert attention.shape == (40,) and torch.isclose(attention.sum(), torch.tensor(1.0))
    perm = torch.randperm(40)
    assert torch.allclose(model(bag), model(bag[perm]), atol=1e-6)
    assert model(bag).shape == (1, 2)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_linear_head_contributions_add_up_to_the_output(pooling):
    torch.manual_seed(4)
    model = PoolingLinear(5, 1, pooling)
    bag = torch.randn(30, 5)
    contrib = model.contributions(bag)
    bias = model.linear.bias[0]
    total = contrib.mean() if pooling == "mean" else contrib.sum()
    assert torch.isclose(total + bias, model(bag)[0, 0], atol=1e-5)


def test_cox_loss_matches_hand_computed_partial_likelihood():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.1])
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    e = [math.exp(r) for r in risk.tolist()]
    expected = -((0.5 - math.log(sum(e))) + (-0.2 - math.log(sum(e[1:]))) + (0.1 - math.log(e[3]))) / 3
    assert cox_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)
    # Breslow ties: both events at t=2 share the risk set {t >= 2}
    time_tied = torch.tensor([1.0, 2.0, 2.0, 4.0])
    event_tied = torch.tensor([0.0, 1.0, 1.0, 0.0])
    expected_tied = -((-0.2 - math.log(sum(e[1:]))) + (1.0 - math.log(sum(e[1:])))) / 2
    assert cox_loss(risk, time_tied, event_tied).item() == pytest.approx(expected_tied, rel=1e-6)
    # the loss falls when risks follow the event order
    good = cox_loss(torch.tensor([3.0, 2.0, 1.0, 0.0]), time, torch.ones(4))
    bad = cox_loss(torch.tensor([0.0, 1.0, 2.0, 3.0]), time, torch.ones(4))
    assert good < bad


def test_build_model_names():
    assert isinstance(create_slide_model("nic-cnn", 5, 1, width=8, crop=32), NicCNN)
    assert isinstance(create_slide_model("abmil", 5, 1), GatedAttentionMIL)
    assert create_slide_model("max", 5, 1).pooling == "max"
    with pytest.raises(ValueError):
        create_slide_model("resnet", 5, 1)


def test_registry_entries_say_what_they_read_and_refuse_clashes():
    assert set(list_slide_models()) >= {"nic-cnn", "abmil", "mean", "max"}
    assert get_slide_model_spec("nic-cnn").input == "grid" and get_slide_model_spec("abmil").input == "bag"
    assert get_slide_model_spec("abmil").defaults["epochs"] == 200
    with pytest.raises(NicError, match="choose one of"):
        get_slide_model_spec("resnet")
    with pytest.raises(ValueError, match="already registered"):
        register_slide_model("mean", input="bag", defaults=dict(epochs=1, lr=1.0, weight_decay=0.0),
                             build=lambda c, n, **_: PoolingLinear(c, n))
    with pytest.raises(ValueError, match="need crop"):
        register_slide_model("bad-grid", input="grid", defaults=dict(epochs=1), build=NicCNN)
    assert "bad-grid" not in list_slide_models()


def test_attention_contributions_add_up_to_the_output():
    torch.manual_seed(5)
    model = GatedAttentionMIL(6, 2, dropout=0.0).eval()
    bag = torch.randn(40, 6)
    for index in range(2):
        contrib = model.instance_scores(bag, index)
        assert torch.isclose(contrib.mean() + model.head.bias[index], model(bag)[0, index], atol=1e-5)
