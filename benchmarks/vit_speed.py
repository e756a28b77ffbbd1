"""Patches/s of Vision Transformers with random weights: the plain ViT-S/16, ViT-B/16 and ViT-L/16
at 224 px on this CPU (issue 23, docs/benchmarks.md "Foundation encoders: speed"), and the
foundation presets of ``nic_models.presets`` on a GPU (``benchmarks/gpu.py`` calls
:func:`preset_rate`).

    nice -n 5 python benchmarks/vit_speed.py                     # CPU, fp32 (+ bf16 where native)
    python benchmarks/vit_speed.py --models vit_small_patch16_224 --batch 32 --seconds 10

Every network is built where it runs (``with torch.device(device)``: no CPU copy, no meta
tensors, random weights), in eval mode under ``torch.inference_mode``; attention is PyTorch's
``scaled_dot_product_attention`` (timm's fused attention, checked on every block). Half
precision is autocast (weights fp32, matmuls in fp16/bf16), as ``nic compress`` encodes. The
load average is read before and after each measurement: the figures only mean something with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

CPU_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_facts() -> dict:
    """Model name, logical CPUs and the SIMD flags that decide fp32/bf16 speed."""
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": [f for f in wanted if f in flags], "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def use_sdpa(net: torch.nn.Module) -> int:
    """Switch every timm attention block to ``F.scaled_dot_product_attention``; how many there are."""
    blocks = [m for m in net.modules() if hasattr(m, "fused_attn")]
    for module in blocks:
        module.fused_attn = True
    return len(blocks)


def measure(net: torch.nn.Module, batch: int, size: int, precision: str, device: str, seconds: float) -> dict:
    """Patches/s of ``net`` on a random batch already on ``device`` (one warm-up batch first)."""
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST[precision])
                if precision in AUTOCAST else torch.autocast(device_type=torch.device(device).type, enabled=False))

    def once():
        out = net(x)
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode(), autocast:
        once()
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            once()
            n += batch
    elapsed = time.perf_counter() - start
    return {"patches": n, "seconds": round(elapsed, 2), "rate": round(n / elapsed, 2), "batch": batch,
            "precision": precision, "device": device}


def build_on(device: str, factory) -> torch.nn.Module:
    """``factory()`` built with its random weights allocated on ``device`` directly, in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):
        net = factory()
    return net.eval()


def vit_rate(architecture: str, batch: int, precision: str = "fp32", device: str = "cpu", seconds: float = 20.0,
             size: int = 224) -> dict:
    """One plain timm ViT (random weights, no classifier): patches/s of its forward features."""
    import timm

    net = build_on(device, lambda: timm.create_model(architecture, pretrained=False, num_classes=0, img_size=size))
    result = {"model": architecture, "params": sum(p.numel() for p in net.parameters()),
              "sdpa_blocks": use_sdpa(net), "size": size}
    return result | measure(net, batch, size, precision, device, seconds)


def preset_rate(name: str, batch: int, precision: str, device: str, seconds: float) -> dict:
    """A foundation preset as ``nic compress`` runs it (its token-ViT with the card's feature
    definition, random weights built on ``device``), at its network input size."""
    from nic_models.presets import PRESETS
    from nic_models.registry import lookup

    preset = next(p for p in PRESETS if p.name == name)
    entry = lookup(name)[0]
    net = build_on(device, entry.factory)
    size = entry.spec.input_size or entry.spec.patch_size
    result = {"model": name, "architecture": preset.architecture, "code_dim": preset.code_dim,
              "params": sum(p.numel() for p in net.parameters()), "sdpa_blocks": use_sdpa(net), "size": size}
    try:
        result |= measure(net, batch, size, precision, device, seconds)
    finally:
        del net
        if device != "cpu":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CPU_MODELS), help="timm architectures, comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per model and precision")
    parser.add_argument("--precision", default="auto",
                        help="fp32, bf16, fp16 or auto (fp32, plus bf16 where the CPU has native bf16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    facts = cpu_facts() if args.device == "cpu" else {"gpu": torch.cuda.get_device_name(0)}
    precisions = (["fp32"] + (["bf16"] if facts.get("native_bf16") else [])) if args.precision == "auto" \
        else args.precision.split(",")
    results = {"machine": facts, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    print(json.dumps(facts), flush=True)
    for architecture in args.models.split(","):
        for precision in precisions:
            before = load_average()
            row = vit_rate(architecture, args.batch, precision, args.device, args.seconds)
            row |= {"load_before": before, "load_after": load_average()}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
