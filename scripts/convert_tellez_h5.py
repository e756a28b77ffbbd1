#!/usr/bin/env python
"""Convert the NIC authors' Keras encoders (HDF5) to safetensors + JSON model cards.

Source: github.com/davidtellez/neural-image-compression (commit 2f2e9ca7),
models/encoders_patches_pathology/{encoder_multitask-4.h5, encoder_bigan.h5}, MIT licence.
Reads the weights with h5py only (no TensorFlow), checks the Keras config is the NIC
architecture, and writes (deterministically: same input -> byte-identical output)

    models/weights/nic-mtl4-tellez2020.safetensors + .json
    models/weights/nic-bigan-tellez2019.safetensors + .json
    models/weights/LICENSE-nic-tellez2019

Layout change: conv kernels (kh, kw, in, out) -> (out, in, kh, kw); the Dense kernel (in, out)
has its rows in Keras' channels-last flatten order (h, w, c) and becomes a (out, c*h*w) matrix
for PyTorch's channels-first flatten.

    python scripts/convert_tellez_h5.py [--src ../shared/models/nic-tellez2019] [--out models/weights]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "models" / "nic-tellez2019"
DEFAULT_OUT = REPO / "models" / "weights"
LICENCE_NAME = "LICENSE-nic-tellez2019"
UPSTREAM = "github.com/davidtellez/neural-image-compression (commit 2f2e9ca7), models/encoders_patches_pathology/"

MODELS = {
    "nic-mtl4-tellez2020": {
        "file": "encoder_multitask-4.h5",
        "description": "Supervised multitask NIC encoder (4 tasks) of Tellez et al., MIDL 2020.",
        "citation": "D. Tellez, D. Hoppener, C. Verhoef, D. Grunhagen, P. Nierop, M. Drozdzal, J. van der Laak, "
                    "F. Ciompi. Extending Unsupervised Neural Image Compression With Supervised Multitask "
                    "Learning. Medical Imaging with Deep Learning (MIDL), PMLR 121:770-783, 2020.",
        "aliases": [],
    },
    "nic-bigan-tellez2019": {
        "file": "encoder_bigan.h5",
        "description": "BiGAN (unsupervised) NIC encoder of Tellez et al., IEEE TPAMI 2019.",
        "citation": "D. Tellez, G. Litjens, J. van der Laak, F. Ciompi. Neural Image Compression for Gigapixel "
                    "Histopathology Image Analysis. IEEE TPAMI 43(2):567-578, 2021 (online 2019), "
                    "doi:10.1109/TPAMI.2019.2936841.",
        "aliases": [],
    },
}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keras_layers(h5: h5py.File) -> list[dict]:
    """The model's layers in order, nested ``Sequential`` models flattened."""
    config = json.loads(h5.attrs["model_config"])

    def walk(layers):
        for layer in layers:
            if layer["class_name"] in ("Sequential", "Model"):
                inner = layer["config"]
                yield from walk(inner["layers"] if isinstance(inner, dict) else inner)
            else:
                yield layer

    return list(walk(config["config"]["layers"]))


def keras_weights(h5: h5py.File) -> dict[str, np.ndarray]:
    """Every weight by its Keras name (``conv2d_1/kernel:0``), top-level or nested groups alike."""
    weights = {}
    group = h5["model_weights"]
    for layer_name in group.attrs["layer_names"]:
        layer = group[layer_name.decode()]
        for weight_name in layer.attrs["weight_names"]:
            weight_name = weight_name.decode()
            weights[weight_name] = np.asarray(layer[weight_name], dtype=np.float32)
    return weights


def check_architecture(layers: list[dict]) -> None:
    """Fail loudly unless the config is the NIC encoder this conversion assumes."""
    kinds = [layer["class_name"] for layer in layers if layer["class_name"] != "InputLayer"]
    expected = ["Conv2D", "LeakyReLU", "BatchNormalization"] * 4 + ["Flatten", "Dense"]
    assert kinds == expected, f"unexpected layer sequence {kinds}"
    for layer in layers:
        c = layer["config"]
        if layer["class_name"] == "InputLayer" or "batch_input_shape" in c:
            assert list(c["batch_input_shape"][1:]) == [64, 64, 3], c["batch_input_shape"]
        if layer["class_name"] == "Conv2D":
            assert (c["filters"], tuple(c["kernel_size"]), tuple(c["strides"]), c["padding"], c["data_format"],
                    c["activation"], c["use_bias"]) == (128, (3, 3), (2, 2), "valid", "channels_last", "linear", True), c
        if layer["class_name"] == "LeakyReLU":
            assert abs(c["alpha"] - 0.2) < 1e-6, c
        if layer["class_name"] == "BatchNormalization":
            assert (c["axis"], c["epsilon"], c["center"], c["scale"]) == (-1, 0.001, True, True), c
        if layer["class_name"] == "Dense":
            assert (c["units"], c["activation"], c["use_bias"]) == (128, "linear", True), c


def convert(h5_path: Path) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """PyTorch state dict of ``nic_models.encoders.NicCNN`` and the (torch key, Keras weight, transform) map."""
    with h5py.File(h5_path, "r") as h5:
        layers = keras_layers(h5)
        check_architecture(layers)
        kw = keras_weights(h5)
    state, order = {}, []

    def put(key, keras_name, transform, array):
        state[key] = np.ascontiguousarray(array, dtype=np.float32)
        order.append([key, keras_name, transform])

    convs = [lay["config"]["name"] for lay in layers if lay["class_name"] == "Conv2D"]
    bns = [lay["config"]["name"] for lay in layers if lay["class_name"] == "BatchNormalization"]
    dense = [lay["config"]["name"] for lay in layers if lay["class_name"] == "Dense"][0]
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        p = f"blocks.{i}"
        put(f"{p}.conv.weight", f"{conv}/kernel:0", "transpose(3,2,0,1)", kw[f"{conv}/kernel:0"].transpose(3, 2, 0, 1))
        put(f"{p}.conv.bias", f"{conv}/bias:0", "copy", kw[f"{conv}/bias:0"])
        put(f"{p}.bn.weight", f"{bn}/gamma:0", "copy", kw[f"{bn}/gamma:0"])
        put(f"{p}.bn.bias", f"{bn}/beta:0", "copy", kw[f"{bn}/beta:0"])
        put(f"{p}.bn.running_mean", f"{bn}/moving_mean:0", "copy", kw[f"{bn}/moving_mean:0"])
        put(f"{p}.bn.running_var", f"{bn}/moving_variance:0", "copy", kw[f"{bn}/moving_variance:0"])
    kernel = kw[f"{dense}/kernel:0"]  # (h*w*c, out), rows in (h, w, c) order
    n_out, c = kernel.shape[1], 128
    side = int(round((kernel.shape[0] / c) ** 0.5))
    assert side * side * c == kernel.shape[0], kernel.shape
    reordered = kernel.reshape(side, side, c, n_out).transpose(3, 2, 0, 1).reshape(n_out, -1)
    put("dense.weight", f"{dense}/kernel:0", f"reshape({side},{side},{c},{n_out}).transpose(3,2,0,1)"
        f".reshape({n_out},{c * side * side})  # Keras HWC flatten -> torch CHW flatten", reordered)
    put("dense.bias", f"{dense}/bias:0", "copy", kw[f"{dense}/bias:0"])
    return state, order


def write(name: str, src: Path, out: Path) -> Path:
    """Convert one model; write its safetensors and card; return the card path."""
    import torch
    from safetensors.torch import save_file

    info = MODELS[name]
    h5_path = src / info["file"]
    state, order = convert(h5_path)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    for i in range(4):  # so the file loads strictly into nn.BatchNorm2d
        tensors[f"blocks.{i}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    st_path = out / f"{name}.safetensors"
    save_file(dict(sorted(tensors.items())), str(st_path), metadata={"nic": json.dumps(  # one key: safetensors' Rust writer orders keys at random
        {"name": name, "source_file": info["file"], "source_sha256": sha256(h5_path)}, sort_keys=True)})
    licence_lines = (src / "LICENSE").read_text().splitlines()
    card = {
        "name": name,
        "aliases": info["aliases"],
        "description": info["description"],
        "architecture": "nic-cnn",
        "architecture_kwargs": {"patch_size": 128, "input_pool": 2, "channels": 128, "n_blocks": 4, "code_dim": 128},
        "patch_size": 128,
        "stride": 128,
        "mpp": 0.5,
        "code_dim": 128,
        "normalisation": "nic",
        "normalisation_note": "x / 255 * 2 - 1, then 2x2 average pooling to 64x64 (inside the model)",
        "weights": st_path.name,
        "weights_sha256": sha256(st_path),
        "licence": {"spdx": "MIT", "copyright": next(ln for ln in licence_lines if ln.startswith("Copyright")),
                    "file": LICENCE_NAME},
        "source": {"file": info["file"], "sha256": sha256(h5_path), "upstream": UPSTREAM,
                   "format": "Keras 2.0.9 / TensorFlow HDF5"},
        "citation": info["citation"],
        "conversion": "scripts/convert_tellez_h5.py",
        "layer_order": order,
    }
    card_path = out / f"{name}.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder with the .h5 files and LICENSE")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (models/weights)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.src / "LICENSE", args.out / LICENCE_NAME)
    for name in MODELS:
        print(write(name, args.src, args.out))


if __name__ == "__main__":
    main()
