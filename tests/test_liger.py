"""Where kd takes liger-kernel's fused cross-entropy (`kernels.liger_cross_entropy`): on CUDA with
the package importable and KD_LIGER not 0, nowhere else. The decision is tested here on the CPU;
the kernel itself runs on a GPU only (bench/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import itertools

import pytest

from kd import kernels

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("device", "installed", "switch"),
                         list(itertools.product(["cpu", "cuda", "mps"], [True, False], [None, "1", "0"])))
def test_liger_is_taken_on_cuda_with_the_package_unless_switched_off(device, installed, switch):
    assert kernels.liger_wanted(device, installed, switch) == (device == "cuda" and installed and switch != "0")


def test_the_cpu_keeps_kds_own_cross_entropy(monkeypatch):
    monkeypatch.delenv(kernels.LIGER_SWITCH, raising=False)
    assert kernels.liger_cross_entropy("cpu") is None


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_cuda_without_the_package_keeps_kds_own_cross_entropy():
    assert kernels.liger_cross_entropy("cuda") is None


def test_kd_liger_0_switches_it_off_on_cuda(monkeypatch):
    monkeypatch.setenv(kernels.LIGER_SWITCH, "0")
    assert kernels.liger_cross_entropy("cuda") is None
