"""Device and precision policy: each process decides from its own hardware."""

import pytest

from pipeline.runtime import device
from pipeline.runtime.device import cpu_has_native_bf16, resolve_device, resolve_precision


def test_cpu_precision_follows_native_bf16(monkeypatch):
    monkeypatch.setenv("NIC_CPU_BF16", "0")  # an AVX2-only CPU: emulated bf16 is ~5x slower than fp32
    assert not cpu_has_native_bf16() and resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setenv("NIC_CPU_BF16", "1")
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"  # an explicit choice is kept


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("NIC_CPU_BF16", raising=False)
    flags = device.cpu_flags()
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert "sse2" in flags or not flags  # x86 machines list their flags


def test_unknown_choices_are_refused():
    with pytest.raises(ValueError):
        resolve_precision("int8", "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_auto_device_is_the_cpu_without_a_gpu():
    if device.gpu_count():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "cpu"
