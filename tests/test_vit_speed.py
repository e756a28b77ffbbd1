"""benchmarks/vit_speed.py, which docs/benchmarks.md's ViT figures and benchmarks/gpu.py's preset
rows come from: a preset is built with its random weights where it runs, every attention block goes
through SDPA, and the rate is of real forward passes."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vit_speed  # noqa: E402
from nic_models.presets import PRESETS  # noqa: E402


def test_preset_rate_builds_the_preset_on_the_device_with_sdpa_attention():
    torch.set_num_threads(1)
    preset = next(p for p in PRESETS if p.name == "kaiko-vits16")
    row = vit_speed.preset_rate("kaiko-vits16", 1, "fp32", "cpu", 0.0)
    assert row["params"] == preset.params and row["code_dim"] == preset.code_dim == 384
    assert row["sdpa_blocks"] == 12 and row["size"] == 224
    assert row["patches"] == 1 and row["rate"] > 0 and row["precision"] == "fp32"


def test_cpu_facts_name_the_simd_that_decides_bf16():
    facts = vit_speed.cpu_facts()
    assert facts["logical_cpus"] >= 1 and isinstance(facts["native_bf16"], bool)
    assert facts["native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(facts["flags"]))
