"""Foundation presets, strict loading, and weights found offline (file, snapshot folder, HF cache).

References are built here, independently of the registry: timm's own module with the card's
keyword arguments, the card's pre-processing written out (x / 255, resize, mean/std) and the
card's feature definition; a vendor file in Hugging Face ``transformers`` layout is written from
the timm weights by this file's own renaming (the inverse of the loader's).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nic_models.presets import PRESETS
from nic_models.registry import _REGISTRY, create_encoder, get_spec, register_timm_encoder
from nic_models.specs import normalisation_mean_std
from nic_pipeline.errors import NicError

BUILDABLE = [p for p in PRESETS if p.architecture != "unavailable"]
SMALL_VIT = ["kaiko-vits16", "lunit-vits8", "phikon", "hibou-b"]


@pytest.fixture
def scratch_registry():
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)


def patches(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def reference_input(spec, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255.0
    if spec.input_size and spec.input_size != spec.patch_size:
        x = F.interpolate(x, size=(spec.input_size,) * 2, mode=spec.input_resize, antialias=True)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in normalisation_mean_std(spec.normalisation))
    return ((x - mean) / std).float()


def timm_reference(preset):
    layers = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": torch.nn.SiLU}
    kw = {k: layers.get(v, v) if isinstance(v, str) else v for k, v in preset.kwargs.items()}
    eps = kw.pop("layer_norm_eps", None)
    if eps is not None:
        kw["norm_layer"] = lambda d, **dd: torch.nn.LayerNorm(d, eps=eps, **dd)
    return timm.create_model(preset.architecture, pretrained=False, num_classes=0, **kw).eval()


def feature(preset, model, x):
    tokens = model.forward_features(x)
    cls = tokens[:, 0]
    if preset.feature == "cls":
        return cls
    return torch.cat([cls, tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1)


def timm_to_hf(state: dict, model) -> dict:
    """timm ViT keys -> the Hugging Face layout the Hub holds (transformers 4 ``save_pretrained``)."""
    vit = "layernorm_before" if True else None
    out = {}
    dinov2 = any(k.endswith("ls1.gamma") for k in state)
    for k, v in state.items():
        parts = k.split(".")
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "reg_token":
            out["embeddings.register_tokens"] = v
        elif k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + parts[-1]] = v
        elif k.startswith("norm."):
            out["layernorm." + parts[-1]] = v
        elif parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            pre = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, chunk in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[pre + f"attention.attention.{name}.{parts[-1]}"] = chunk.clone()
            else:
                table = ({"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
                          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "ls1": "layer_scale1", "ls2": "layer_scale2"}
                         if dinov2 else
                         {"norm1": vit, "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
                module = rest.rsplit(".", 1)[0]
                leaf = "lambda1" if parts[-1] == "gamma" else parts[-1]
                out[pre + f"{table[module]}.{leaf}"] = v
        else:
            raise AssertionError(f"unexpected timm key {k}")
    if getattr(model, "no_embed_class", False):  # HF keeps a class-token row in the position embedding
        row = torch.randn(1, 1, v.shape[-1]) if False else torch.randn_like(state["cls_token"])
        out["embeddings.position_embeddings"] = torch.cat([row, state["pos_embed"]], dim=1)
        out["embeddings.cls_token"] = state["cls_token"] - row
    out["embeddings.mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


# --------------------------------------------------------------------------- every preset, on meta


@pytest.mark.parametrize("preset", BUILDABLE, ids=lambda p: p.name)
@pytest.mark.slow
def test_preset_builds_on_meta_with_the_shape_its_card_declares(preset):
    spec = get_spec(preset.name)
    assert spec.code_dim == preset.code_dim and spec.params == preset.params
    assert spec.licence and spec.commercial is not None and spec.gated is not None and spec.citation
    with torch.device("meta"):
        net = _REGISTRY[preset.name].factory()
        out = net(torch.empty(2, 3, spec.network_input, spec.network_input))
    assert tuple(out.shape) == (2, preset.code_dim)
    assert sum(p.numel() for p in net.parameters()) == preset.params
    if preset.architecture == "resnet50-trunc":
        keys = set(net.state_dict())
        assert not any(".layer4." in k for k in keys) and any(".layer3." in k for k in keys)
        return
    keys = {k.removeprefix("trunk.") for k in net.state_dict()}
    depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    assert depth == preset.depth
    assert net.trunk.cls_token.shape[-1] == preset.embed_dim
    assert (net.trunk.reg_token.shape[1] if net.trunk.reg_token is not None else 0) == preset.reg_tokens
    assert ("blocks.0.ls1.gamma" in keys) == preset.layerscale
    if preset.key_format != "timm":  # the vendor's layout maps back onto exactly this key set
        from nic_models.presets_nets import KEY_MAPS

        state = {k: torch.zeros(v.shape) for k, v in net.trunk.state_dict().items()}
        mapped = KEY_MAPS[preset.key_format](timm_to_hf(state, net.trunk), net.trunk)
        assert set(mapped) == set(state)


def test_unavailable_presets_say_why_and_list_their_facts():
    for name in ("conch-v1.5", "ctranspath"):
        spec = get_spec(name)
        assert spec.code_dim == 768 and spec.licence
        with pytest.raises(NicError, match="TRIDENT"):
            create_encoder(name)


# --------------------------------------------------------------------------- strict loading


@pytest.mark.slow
def test_layerscale_checkpoint_refused_by_a_plain_vit_and_loaded_by_the_right_entry(tmp_path, scratch_registry):
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, init_values=1e-5).eval()
    with torch.no_grad():  # LayerScale far from identity, so dropping it would show
        for name, p in reference.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0.0, 0.5)
    path = tmp_path / "vits_ls.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with pytest.raises(NicError) as info:
        create_encoder("timm:vit_small_patch16_224", weights=path)
    assert "ls1.gamma" in str(info.value) and "ls2.gamma" in str(info.value)

    register_timm_encoder("vits-ls", "vit_small_patch16_224", init_values=1e-5)
    enc = create_encoder("vits-ls", weights=path)
    pixels = patches(3, 224)
    with torch.inference_mode():
        got = enc(pixels).numpy()
        want = reference(reference_input(enc.spec, pixels)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_unknown_key_refuses_but_a_dropped_classifier_head_does_not(tmp_path):
    net = timm.create_model("vit_small_patch16_224", pretrained=False)  # with its 1000-class head
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    ok = tmp_path / "with_head.safetensors"
    save_file(state, str(ok))
    create_encoder("timm:vit_small_patch16_224", weights=ok)
    bad = tmp_path / "with_stray.safetensors"
    save_file({**state, "stray.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(NicError, match="stray.weight"):
        create_encoder("timm:vit_small_patch16_224", weights=bad)
    lacking = tmp_path / "lacking.safetensors"
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(lacking))
    with pytest.raises(NicError, match="lacks.*norm.weight"):
        create_encoder("timm:vit_small_patch16_224", weights=lacking)


# --------------------------------------------------------------------------- vendor layouts


def _vendor_file(preset, tmp_path, seed=0):
    torch.manual_seed(seed)
    reference = timm_reference(preset)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("gamma") or name in ("cls_token", "reg_token", "pos_embed"):
                p.normal_(0.0, 0.3)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if preset.key_format != "timm":
        state = timm_to_hf(state, reference)
    path = tmp_path / preset.weight_files[0].replace(".bin", ".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return reference, path


@pytest.mark.parametrize("name", SMALL_VIT)
@pytest.mark.slow
def test_small_presets_load_the_vendor_layout_and_match_the_reference(name, tmp_path):
    preset = next(p for p in PRESETS if p.name == name)
    reference, path = _vendor_file(preset, tmp_path)
    enc = create_encoder(name, weights=path)
    pixels = patches(2, enc.spec.patch_size, seed=1)
    with torch.inference_mode():
        got = enc(pixels).numpy()
        want = feature(preset, reference, reference_input(enc.spec, pixels)).numpy()
    assert got.shape == (2, preset.code_dim)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


def test_phikon_matches_transformers_vitmodel(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, image_size=224, patch_size=16, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    hf = transformers.ViTModel(config, add_pooling_layer=True).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    enc = create_encoder("phikon", weights=path)
    pixels = patches(2, 224, seed=2)
    with torch.inference_mode():
        want = hf(pixel_values=reference_input(enc.spec, pixels)).last_hidden_state[:, 0].numpy()
        got = enc(pixels).numpy()
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


@pytest.mark.slow
def test_resnet50_imagenet_preset_resizes_256_to_224_and_matches_layer3(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    tv = resnet50().eval()  # torchvision layout, as timm/resnet50.tv_in1k holds it
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    enc = create_encoder("resnet50-imagenet", weights=path)
    assert enc.spec.patch_size == 256 and enc.spec.input_size == 224
    pixels = patches(2, 256, seed=3)
    x = reference_input(enc.spec, pixels)
    with torch.inference_mode():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        want = tv.layer3(tv.layer2(tv.layer1(h))).mean(dim=(2, 3)).numpy()
        got = enc(pixels).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- where weights come from


def _hf_cache(root, repo_id, filename, payload_path):
    """The layout huggingface_hub writes: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    import hashlib

    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    data = payload_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / sha).write_bytes(data)
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(f"../../blobs/{sha}", snap / filename)
    (snap / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return sha


@pytest.mark.slow
def test_weights_from_the_hf_cache_by_repository_id_offline(tmp_path, monkeypatch):
    from nic_models.registry import weights_found, weights_sha256

    preset = next(p for p in PRESETS if p.name == "kaiko-vits16")
    reference, path = _vendor_file(preset, tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NicError, match=f"hf download {preset.hf_repo}"):
        create_encoder("kaiko-vits16")
    assert weights_found("kaiko-vits16") is None

    sha = _hf_cache(tmp_path / "hf", preset.hf_repo, "model.safetensors", path)
    assert weights_found("kaiko-vits16").endswith("model.safetensors")
    assert weights_sha256("kaiko-vits16") == sha  # the blob's name: no multi-GB hashing
    pixels = patches(2, 224, seed=4)
    want = feature(preset, reference, reference_input(get_spec("kaiko-vits16"), pixels)).detach().numpy()
    for enc in (create_encoder("kaiko-vits16"), create_encoder("kaiko-vits16", weights=preset.hf_repo)):
        assert enc.weights_sha256 == sha
        with torch.inference_mode():
            np.testing.assert_allclose(enc(pixels).numpy(), want, atol=5e-5, rtol=0)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # the other variable, same cache
    monkeypatch.delenv("HF_HOME")
    assert weights_found("kaiko-vits16") is not None


def test_weights_from_a_snapshot_folder(tmp_path):
    preset = next(p for p in PRESETS if p.name == "kaiko-vits16")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    reference, _ = _vendor_file(preset, folder)
    (folder / "config.json").write_text("{}")
    enc = create_encoder("kaiko-vits16", weights=folder)
    pixels = patches(1, 224, seed=5)
    with torch.inference_mode():
        want = feature(preset, reference, reference_input(enc.spec, pixels)).numpy()
        np.testing.assert_allclose(enc(pixels).numpy(), want, atol=5e-5, rtol=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NicError, match="holds none of"):
        create_encoder("kaiko-vits16", weights=empty)
