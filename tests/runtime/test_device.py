"""Device and precision policy: each process decides from its own hardware."""

import subprocess
import sys

import pytest

from nic_pipeline.runtime import device
from nic_pipeline.runtime.device import cpu_has_native_bf16, resolve_device, resolve_precision


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


def test_array_work_picks_its_device_without_torch():
    """Tissue detection asks for its device through CuPy: importing torch (seconds) would hold
    back the first task of every run."""
    code = ("import sys; from nic_pipeline.runtime.device import resolve_array_device, cupy_gpu; "
            "print(resolve_array_device() == ('cuda' if cupy_gpu() else 'cpu'), resolve_array_device('cpu'), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "cpu", "False"]
    with pytest.raises(ValueError):
        device.resolve_array_device("tpu")


def test_the_embedded_cluster_counts_gpus_as_dask_cuda_does(monkeypatch):
    """NVML's count (what dask-cuda uses, no torch), limited to CUDA_VISIBLE_DEVICES when set."""
    from distributed.diagnostics import nvml

    monkeypatch.setattr(nvml, "device_get_count", lambda: 4)
    for visible, expected in ((None, 4), ("0,2", 2), ("", 0), ("-1", 0), ("GPU-1a2b,GPU-3c4d,GPU-5e6f", 3)):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert device.nvml_gpu_count() == expected, visible
