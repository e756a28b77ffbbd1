"""The encoder registry and the encoders behind it.

The NIC port is checked against an independent NumPy forward pass computed straight from the
authors' Keras HDF5 weights (own strided conv, own channels-last flatten), so a wrong kernel
transpose or dense-row order cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from safetensors.torch import save_file

from nic_models import registry
from nic_models.encoders import DihedralMean, Encoder, NicCNN
from nic_models.licences import licence_line
from nic_models.registry import (
    DEFAULT_ENCODER,
    EncoderSpec,
    create_encoder,
    get_spec,
    list_encoders,
    register_encoder,
    register_from_card,
    register_timm_encoder,
    save_encoder,
    weights_dir,
)
from nic_pipeline.errors import NicError
from tests.conftest import HAS_GPU, shared_model

H5 = {"nic-mtl4-tellez2020": "encoder_multitask-4.h5", "nic-bigan-tellez2019": "encoder_bigan.h5"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def random_patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def scratch_registry():
    """Registry entries added by a test are removed afterwards."""
    before, aliases = dict(registry._REGISTRY), dict(registry._ALIASES)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)
    registry._ALIASES.clear()
    registry._ALIASES.update(aliases)


def codes(encoder, patches) -> np.ndarray:
    with torch.inference_mode():
        return encoder(torch.from_numpy(np.ascontiguousarray(patches))).numpy()


# --------------------------------------------------------------------------- independent reference


def keras_reference(h5_path, patches: np.ndarray) -> np.ndarray:
    """NIC encoder forward pass in float64 NumPy from the Keras weights (NHWC throughout)."""
    w = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            layer, weight = name.split("/")[-2:]
            w[f"{layer}/{weight}"] = obj[()].astype(np.float64)

    with h5py.File(h5_path, "r") as f:
        f.visititems(visit)

    def layers(prefix):
        names = {k.split("/")[0] for k in w if k.startswith(prefix)}
        return sorted(names, key=lambda s: int(s.rsplit("_", 1)[1]))

    convs, bns = layers("conv2d_"), layers("batch_normalization_")
    (dense,) = {k.split("/")[0] for k, v in w.items() if k.endswith("kernel:0") and v.ndim == 2}
    assert len(convs) == len(bns) == 4

    n = len(patches)
    x = patches.astype(np.float64) / 255.0 * 2.0 - 1.0
    x = x.reshape(n, 64, 2, 64, 2, 3).mean(axis=(2, 4))  # 2x2 average pooling
    for conv, bn in zip(convs, bns):
        windows = sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2]  # (n, oh, ow, c, 3, 3)
        x = np.einsum("nhwcij,ijco->nhwo", windows, w[f"{conv}/kernel:0"]) + w[f"{conv}/bias:0"]
        x = np.where(x > 0, x, 0.2 * x)
        x = (x - w[f"{bn}/moving_mean:0"]) / np.sqrt(w[f"{bn}/moving_variance:0"] + 1e-3)
        x = x * w[f"{bn}/gamma:0"] + w[f"{bn}/beta:0"]
    assert x.shape[1:] == (3, 3, 128)
    return x.reshape(n, -1) @ w[f"{dense}/kernel:0"] + w[f"{dense}/bias:0"]  # Keras H, W, C flatten


@pytest.mark.parametrize("name", sorted(H5))
def test_port_matches_numpy_reference_from_h5(name):
    h5_path = shared_model("nic-tellez2019", H5[name])
    example = np.asarray(Image.open(shared_model("nic-tellez2019", "example_128.jpg")).convert("RGB"))
    patches = np.concatenate([example[None], random_patches(3, 128, seed=1)])
    expected = keras_reference(h5_path, patches)
    got = codes(create_encoder(name), patches)
    assert got.shape == (4, 128) and got.dtype == np.float32
    assert np.abs(expected).max() > 0.5  # a real signal, not all zeros
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)  # measured: 2.6e-6
    # the example patch is not treated like noise: codes differ between inputs
    assert np.abs(got[0] - got[1]).max() > 0.1


@pytest.mark.parametrize("name", sorted(H5))
def test_shipped_card_records_source_and_weights(name):
    card = json.loads((weights_dir() / f"{name}.json").read_text())
    weights = weights_dir() / card["weights"]
    assert card["weights_sha256"] == sha256(weights)
    assert card["source"]["file"] == H5[name]
    assert card["licence"]["spdx"] == "MIT" and "Copyright" in card["licence"]["copyright"]
    assert (weights_dir() / card["licence"]["file"]).read_text().startswith("MIT License")
    assert card["conversion"] == "scripts/convert_tellez_h5.py"
    assert [row[0] for row in card["layer_order"]][-2:] == ["dense.weight", "dense.bias"]
    h5_path = shared_model("nic-tellez2019", H5[name])
    assert card["source"]["sha256"] == sha256(h5_path)


def test_conversion_is_reproducible(tmp_path):
    src = shared_model("nic-tellez2019")
    from scripts.convert_tellez_h5 import main

    main(["--src", str(src), "--out", str(tmp_path)])
    for name in H5:
        assert sha256(tmp_path / f"{name}.safetensors") == sha256(weights_dir() / f"{name}.safetensors")
        assert (tmp_path / f"{name}.json").read_text() == (weights_dir() / f"{name}.json").read_text()
    assert (tmp_path / "LICENSE-nic-tellez2019").read_bytes() == (src / "LICENSE").read_bytes()


# --------------------------------------------------------------------------- registry


def test_registry_names_specs_and_default_alias():
    names = list_encoders()
    assert {"nic", "nic-mtl4-tellez2020", "nic-bigan-tellez2019", "resnet50-trunc"} <= set(names)
    enc = create_encoder("nic")
    assert isinstance(enc, Encoder) and not enc.training
    assert enc.spec.name == DEFAULT_ENCODER == "nic-mtl-v3-no-monuseg-fast"
    assert enc.weights_sha256 == sha256(weights_dir() / "nic-mtl-v3-no-monuseg-fast.safetensors")
    assert licence_line(enc.spec.licence, enc.spec.commercial).endswith("commercial use: yes")  # issue 22
    for name in H5:
        s = get_spec(name)
        assert (s.patch_size, s.stride, s.mpp, s.code_dim, s.normalisation) == (128, 128, 0.5, 128, "nic")
        assert s.licence.startswith("MIT") and "Tellez" in s.citation
    s = get_spec("resnet50-trunc")
    assert (s.patch_size, s.stride, s.mpp, s.code_dim, s.normalisation) == (224, 224, 0.5, 1024, "imagenet")


def test_unknown_name_and_bad_arguments_are_nic_errors():
    with pytest.raises(NicError, match="unknown encoder 'nope'.*nic-mtl4-tellez2020"):
        create_encoder("nope")
    with pytest.raises(NicError, match="either weights= or random_init"):
        create_encoder("nic", weights=weights_dir() / "nic-bigan-tellez2019.safetensors", random_init=True)
    with pytest.raises(NicError, match="weights file not found"):
        create_encoder("nic", weights="/nonexistent/w.safetensors")
    with pytest.raises(NicError, match="already registered"):
        register_encoder("nic-mtl4-tellez2020", get_spec("nic"), NicCNN)


def test_weights_override_loads_another_file():
    bigan_file = weights_dir() / "nic-bigan-tellez2019.safetensors"
    enc = create_encoder("nic", weights=bigan_file)
    assert enc.weights_sha256 == sha256(bigan_file)
    x = random_patches(2, 128)
    np.testing.assert_array_equal(codes(enc, x), codes(create_encoder("nic-bigan-tellez2019"), x))
    assert np.abs(codes(enc, x) - codes(create_encoder("nic"), x)).max() > 0.1


def test_weights_that_do_not_fit_are_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, str(path))
    with pytest.raises(NicError, match="parameters the file lacks"):
        create_encoder("nic", weights=path)
    bad_shape = NicCNN(code_dim=64).state_dict()
    save_file(bad_shape, str(path))
    with pytest.raises(NicError, match="do not fit"):
        create_encoder("nic", weights=path)


class _NotATensor:
    pass


def test_torch_files_load_with_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": NicCNN().state_dict()}, good)  # a wrapped checkpoint loads
    create_encoder("nic", weights=good)
    evil = tmp_path / "evil.pt"
    torch.save({"x": _NotATensor()}, evil)
    with pytest.raises(NicError, match="cannot read weights"):
        create_encoder("nic", weights=evil)


def test_random_init_is_seeded():
    a = create_encoder("nic", random_init=True, seed=3)
    b = create_encoder("nic", random_init=True, seed=3)
    c = create_encoder("nic", random_init=True, seed=4)
    assert a.weights_sha256 == "random-init-seed3"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = random_patches(2, 128)
    np.testing.assert_array_equal(codes(a, x), codes(b, x))
    assert np.abs(codes(a, x) - codes(c, x)).max() > 1e-3
    # seeding must not disturb the caller's random stream
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    create_encoder("nic", random_init=True, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_input_is_raw_uint8_nhwc_and_batch_independent():
    enc = create_encoder("nic")
    x = random_patches(3, 128, seed=5)
    batch = codes(enc, x)
    np.testing.assert_allclose(codes(enc, x[1:2]), batch[1:2], atol=1e-5)  # eval-mode BatchNorm
    with torch.inference_mode():
        np.testing.assert_array_equal(enc(x).numpy(), batch)  # numpy in, same codes
        manual = enc.net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 * 2 - 1).numpy()
    np.testing.assert_allclose(batch, manual, atol=1e-5)
    with pytest.raises(NicError, match=r"\(N, 128, 128, 3\)"):
        enc(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


# --------------------------------------------------------------------------- other architectures


def test_resnet50_trunc_needs_a_local_weights_file():
    with pytest.raises(NicError, match="needs a local weights file.*weights="):
        create_encoder("resnet50-trunc")


def test_resnet50_trunc_loads_torchvision_weights_and_matches_layer3(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)  # full model: layer4 + fc are ignored
    enc = create_encoder("resnet50-trunc", weights=path)
    assert enc.weights_sha256 == sha256(path)
    x = random_patches(1, 224, seed=2)
    got = codes(enc, x)
    with torch.inference_mode():
        t = (torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255
             - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        t = ref.maxpool(ref.relu(ref.bn1(ref.conv1(t.float()))))
        expected = ref.layer3(ref.layer2(ref.layer1(t))).mean(dim=(2, 3)).numpy()
    assert got.shape == (1, 1024)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_timm_architecture_with_local_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    with pytest.raises(NicError, match="needs a local weights file"):
        create_encoder("timm:vit_tiny_patch16_224")
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=path)
    assert (enc.spec.patch_size, enc.spec.mpp, enc.spec.code_dim) == (224, 0.5, 192)
    x = random_patches(2, 224, seed=4)
    with torch.inference_mode():
        t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
             - torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)) \
            / torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        expected = ref(t).numpy()
    np.testing.assert_allclose(codes(enc, x), expected, atol=1e-4)
    with pytest.raises(NicError, match="unknown timm architecture"):
        create_encoder("timm:no_such_net", random_init=True)


def test_user_registers_a_foundation_model_on_disk(tmp_path, scratch_registry):
    import timm

    torch.manual_seed(1)
    path = tmp_path / "fm.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(path))
    spec = register_timm_encoder("my-fm", "vit_tiny_patch16_224", weights=path, mpp=1.0,
                                 licence="CC-BY-NC-ND-4.0", source="lab model")
    assert "my-fm" in list_encoders() and spec.code_dim == 192 and spec.mpp == 1.0
    enc = create_encoder("my-fm")
    assert enc.weights_sha256 == sha256(path) and enc.spec.licence == "CC-BY-NC-ND-4.0"
    # the generic form: a spec and a factory for the bare network
    mean, std = (0.7, 0.5, 0.6), (0.2, 0.1, 0.3)
    register_encoder("tiny-nic", EncoderSpec("tiny-nic", 64, 64, 1.0, 16, (mean, std)),
                     lambda: NicCNN(patch_size=64, input_pool=1, channels=8, n_blocks=2, code_dim=16))
    enc, x = create_encoder("tiny-nic", random_init=True), random_patches(2, 64)
    with torch.inference_mode():
        t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
            / torch.tensor(std).view(1, 3, 1, 1)
        expected = enc.net(t).numpy()
    assert expected.shape == (2, 16)
    np.testing.assert_allclose(codes(enc, x), expected, atol=1e-5)


def test_register_from_card(tmp_path, scratch_registry):
    """The route for our own trained encoder: safetensors + JSON card -> one call."""
    torch.manual_seed(7)
    net = NicCNN()
    weights = tmp_path / "nic-mtl-test.safetensors"
    save_file(net.state_dict(), str(weights))
    card = {"name": "nic-mtl-test", "architecture": "nic-cnn", "patch_size": 128, "stride": 128, "mpp": 0.5,
            "code_dim": 128, "normalisation": "nic", "weights": weights.name, "weights_sha256": sha256(weights),
            "licence": "MIT", "aliases": ["mtl-test"]}
    card_path = tmp_path / "nic-mtl-test.json"
    card_path.write_text(json.dumps(card))
    spec = register_from_card(card_path)
    assert spec.name == "nic-mtl-test" and {"nic-mtl-test", "mtl-test"} <= set(list_encoders())
    x = random_patches(2, 128)
    with torch.inference_mode():
        expected = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 * 2 - 1).numpy()
    for handle in ("nic-mtl-test", "mtl-test", str(card_path), str(weights)):  # name, alias, card, weights+card
        enc = create_encoder(handle)
        assert enc.spec.name == "nic-mtl-test" and enc.weights_sha256 == sha256(weights)
        np.testing.assert_allclose(codes(enc, x), expected, atol=1e-5)
    # a card whose recorded sha256 does not match its weights file is refused
    card["name"], card["weights_sha256"] = "nic-mtl-bad", "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(card))
    with pytest.raises(NicError, match="does not match the card"):
        create_encoder(str(bad))


def test_a_card_cannot_name_code_to_run(tmp_path, scratch_registry):
    """A card is data: `"architecture": "subprocess:run"` (or any module:callable) is refused
    before anything is imported or called, beside a .safetensors file as on its own."""
    proof = tmp_path / "ran"
    weights = tmp_path / "evil.safetensors"
    save_file(NicCNN().state_dict(), str(weights))
    card = {"name": "evil", "architecture": "subprocess:run", "patch_size": 128, "mpp": 0.5, "code_dim": 128,
            "normalisation": "nic", "weights": weights.name,
            "architecture_kwargs": {"args": ["touch", str(proof)]}}
    (tmp_path / "evil.json").write_text(json.dumps(card))
    for handle in (str(tmp_path / "evil.json"), str(weights)):
        with pytest.raises(NicError, match="unknown architecture|must be numbers"):
            create_encoder(handle)
    card["architecture_kwargs"] = {}
    (tmp_path / "evil.json").write_text(json.dumps(card))
    with pytest.raises(NicError, match="unknown architecture 'subprocess:run'"):
        create_encoder(str(weights))
    assert not proof.exists()


def test_save_encoder_writes_a_card_that_registers(tmp_path, scratch_registry):
    torch.manual_seed(5)
    net = NicCNN().eval()
    card_path = save_encoder(net, tmp_path, "nic-mtl-v0", licence="MIT", source={"config": "x.yaml"},
                             architecture_kwargs={"patch_size": 128}, metrics={"val_auc": 0.9})
    card = json.loads(card_path.read_text())
    assert card["weights_sha256"] == sha256(tmp_path / "nic-mtl-v0.safetensors") and card["metrics"]["val_auc"] == 0.9
    enc = create_encoder("nic-mtl-v0")
    x = random_patches(1, 128)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 * 2 - 1).numpy()
    np.testing.assert_allclose(codes(enc, x), expected, atol=1e-5)


# --------------------------------------------------------------------------- dihedral mean


def test_dihedral_mean_is_flip_and_rotation_invariant():
    base = create_encoder("nic")
    enc = create_encoder("nic", dihedral_mean=True)
    assert isinstance(enc, DihedralMean) and enc.spec.name == DEFAULT_ENCODER + "+dihedral"
    assert enc.spec.code_dim == 128 and enc.weights_sha256 == base.weights_sha256
    x = random_patches(2, 128, seed=11)
    c = codes(enc, x)
    for variant in (x[:, ::-1], x[:, :, ::-1], np.rot90(x, 1, axes=(1, 2)), np.rot90(x[:, ::-1], 3, axes=(1, 2))):
        np.testing.assert_allclose(codes(enc, variant), c, atol=2e-5)
    assert np.abs(codes(base, x[:, ::-1]) - codes(base, x)).max() > 1e-2  # the base encoder is not invariant
    views = [np.rot90(v, k, axes=(1, 2)) for v in (x, x[:, :, ::-1]) for k in range(4)]
    np.testing.assert_allclose(c, np.mean([codes(base, v) for v in views], axis=0), atol=2e-5)
    np.testing.assert_array_equal(codes(create_encoder("nic+dihedral"), x), c)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_encoder_on_gpu_matches_cpu():
    assert HAS_GPU
    x = random_patches(4, 128, seed=8)
    cpu = codes(create_encoder("nic"), x)
    enc = create_encoder("nic", device="cuda")
    with torch.inference_mode():
        gpu = enc(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_weights_sha256_names_the_weights_without_building_the_network():
    from nic_models.registry import weights_sha256

    for name, kwargs in (("nic", {}), ("nic-bigan-tellez2019", {}), ("nic+dihedral", {}),
                         ("resnet50-trunc", {"random_init": True, "seed": 3})):
        assert weights_sha256(name, **kwargs) == create_encoder(name, **kwargs).weights_sha256
    with pytest.raises(NicError, match="needs a local weights file"):
        weights_sha256("resnet50-trunc")


def test_specs_and_weight_hashes_need_no_torch():
    """A client describing a job (grid, code size, weights hash) never imports torch: it would
    add seconds to every `nic compress` start."""
    code = ("import sys; from nic_models.registry import get_spec, weights_sha256; "
            "spec = get_spec('nic'); weights_sha256('nic'); import nic_pipeline.compress.api; "
            "print(spec.code_dim, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["128", "False"]
