"""The encoder's precision and layout per device: fp32 + channels-last on CPUs, bf16 on GPUs."""

from __future__ import annotations

import pytest
import torch

from fmabs_core.errors import InputError
from fmabs_core.generalist import precision


@pytest.fixture()
def cpu_bf16(monkeypatch):
    def set_(value: str) -> None:
        monkeypatch.setenv(precision.ENV_CPU_BF16, value)
        precision.cpu_has_bf16.cache_clear()

    yield set_
    precision.cpu_has_bf16.cache_clear()


def test_cpu_default_is_fp32_channels_last_even_with_bf16_units(cpu_bf16):
    """bf16 missed the 0.005-Dice bar on LA (fmabs bench precision): never the CPU default."""
    cpu = torch.device("cpu")
    for flag in ("1", "0"):
        cpu_bf16(flag)
        assert precision.amp_dtype(cpu, "auto") is None
    assert precision.use_channels_last(cpu) and not precision.use_channels_last(cpu, "contiguous")
    assert not precision.use_channels_last(torch.device("cuda"))
    assert precision.amp_dtype(cpu, "bfloat16") is torch.bfloat16 and precision.amp_dtype(cpu, "float32") is None


def test_bf16_without_native_units_warns(cpu_bf16, caplog):
    cpu_bf16("0")
    with caplog.at_level("WARNING", logger="fmabs_core.generalist.precision"):
        precision.amp_dtype(torch.device("cpu"), "bf16")
    assert any("no native bf16" in r.message for r in caplog.records)


def test_detection_reads_this_machines_flags(cpu_bf16, monkeypatch):
    """Skips where /proc/cpuinfo does not exist (not Linux): there is nothing to compare the detection with."""
    monkeypatch.delenv(precision.ENV_CPU_BF16, raising=False)
    precision.cpu_has_bf16.cache_clear()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    assert precision.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bad_values_are_refused():
    with pytest.raises(InputError, match="not one of auto"):
        precision.amp_dtype(torch.device("cpu"), "int8")
    with pytest.raises(InputError, match="float16 autocast is not supported on CPU"):
        precision.amp_dtype(torch.device("cpu"), "fp16")
    with pytest.raises(InputError, match="layout 'nhwc'"):
        precision.use_channels_last(torch.device("cpu"), "nhwc")
