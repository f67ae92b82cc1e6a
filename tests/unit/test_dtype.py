"""The worker's dtype: ``auto`` is half precision where the hardware computes faster in it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.devices
from completion_queue import ConfigError
from engine.devices import (
    BF16_MIN_SPEEDUP,
    cpu_bf16_speedup,
    cpu_flags,
    cpu_has_native_bf16,
    resolve_dtype,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda:0")
NAMED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: An AVX-512 CPU without AVX512-BF16 (Skylake-SP): torch runs bf16 there, emulated.
EMULATED = {"avx2", "avx512f", "avx512_bw", "avx512_vl", "avx512_dq", "fma3"}


def fake_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str], speedup: float = 3.0) -> None:
    """This CPU's flags, and how much faster its bf16 products measure than float32's."""
    monkeypatch.setattr(engine.devices, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(engine.devices, "cpu_bf16_speedup", lambda: speedup)


def unmeasured(monkeypatch: pytest.MonkeyPatch, flags: set[str]) -> None:
    """This CPU's flags; measuring bf16 products fails the test."""
    monkeypatch.setattr(engine.devices, "cpu_flags", lambda: frozenset(flags))

    def measure() -> float:
        raise AssertionError("a CPU without bf16 instructions needs no measurement")

    monkeypatch.setattr(engine.devices, "cpu_bf16_speedup", measure)


@pytest.mark.parametrize(
    "native",
    [{"avx512_bf16"}, {"amx_bf16", "amx_tile"}, {"avx512_bf16", "amx_bf16"}, {"bf16", "neon"}],
)
def test_auto_is_bfloat16_on_a_cpu_that_computes_in_it(
    monkeypatch: pytest.MonkeyPatch, native: set[str]
) -> None:
    # Given a CPU whose flags name a bf16 instruction set (x86 AVX512-BF16 or AMX, Arm BF16)
    # and whose bf16 products measure three times float32's
    fake_flags(monkeypatch, EMULATED | native, speedup=3.0)
    # Then auto is bfloat16 on it
    assert cpu_has_native_bf16()
    assert resolve_dtype("auto", CPU) == torch.bfloat16


@pytest.mark.parametrize("speedup", [0.57, 1.0, BF16_MIN_SPEEDUP - 0.01])
def test_auto_keeps_float32_where_bf16_instructions_measure_no_faster(
    monkeypatch: pytest.MonkeyPatch, speedup: float
) -> None:
    # Given a CPU that lists AVX512-BF16 but multiplies bf16 at most barely faster than
    # float32 (0.57x: a Xeon VM whose hypervisor hides AMX, this project's machine on 2026-12-02)
    fake_flags(monkeypatch, EMULATED | {"avx512_bf16"}, speedup=speedup)
    # Then auto stays float32
    assert cpu_has_native_bf16()
    assert resolve_dtype("auto", CPU) == torch.float32


def test_the_measurement_is_a_ratio_of_real_products_taken_once() -> None:
    # When this CPU's bf16 products are timed against float32's (the real measurement)
    speedup = cpu_bf16_speedup()
    # Then it is a positive ratio, measured once per process
    assert 0 < speedup < 100
    assert cpu_bf16_speedup() == speedup


@pytest.mark.parametrize("flags", [EMULATED, {"neon", "fp16_arith"}, set()])
def test_auto_keeps_float32_where_bf16_is_emulated(
    monkeypatch: pytest.MonkeyPatch, flags: set[str]
) -> None:
    # Given a CPU without bf16 instructions, or one whose flags cannot be read
    unmeasured(monkeypatch, flags)
    # Then auto stays float32, faster there than emulated bf16
    assert not cpu_has_native_bf16()
    assert resolve_dtype("auto", CPU) == torch.float32


@pytest.mark.parametrize(("bf16_gpu", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_is_bfloat16_or_float16_whatever_the_cpu(
    monkeypatch: pytest.MonkeyPatch, bf16_gpu: bool, expected: torch.dtype
) -> None:
    # Given a GPU with or without bf16, on a CPU without it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: bf16_gpu)
    fake_flags(monkeypatch, EMULATED)
    # Then auto on CUDA is the GPU's half precision, as before
    assert resolve_dtype("auto", CUDA) == expected


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name", NAMED)
def test_a_named_dtype_is_kept(monkeypatch: pytest.MonkeyPatch, name: str, native: bool) -> None:
    fake_flags(monkeypatch, EMULATED | ({"avx512_bf16"} if native else set()))
    assert resolve_dtype(name, CPU) == NAMED[name]
    assert resolve_dtype(name, CUDA) == NAMED[name]


@pytest.mark.parametrize("bad", ["fp8", "bf16", "Float32", ""])
def test_a_bad_dtype_names_the_field_and_the_choices(bad: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_dtype(bad, CPU)
    assert str(raised.value) == (
        f"dtype must be one of auto, float32, float16, bfloat16, got {bad!r}"
    )


def test_flags_come_from_proc_cpuinfo_on_a_torch_without_a_reader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a torch without torch.cpu.get_capabilities, and the cpuinfo of an x86 and an Arm CPU
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n")
    # Then the flags are read from their flags or Features line, nothing else
    assert cpu_flags(str(x86)) == {"fpu", "avx512f", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(str(arm)) == {"fp", "asimd", "sve", "bf16", "i8mm"}
    # And an unreadable file gives no flags (so auto stays float32)
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_flags_come_from_torch_s_reader_where_it_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given torch's reader, which also reports sizes and names beside the flags
    capabilities = {
        "avx512_bf16": True,
        "amx_bf16": False,
        "l2_cache_size": 2097152,
        "sve_max_length": 1,
        "architecture": "x86_64",
    }
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    # Then the flags are the capabilities it says the CPU has, and no /proc file is read
    assert cpu_flags("/nonexistent/cpuinfo") == {"avx512_bf16"}
