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



def test_only_hard_labels_alone_take_the_fused_cross_entropy(monkeypatch):
    """A hard-only student (a baseline twin) takes the fused path where Liger serves (here a
    stand-in in Liger's signature, since no GPU is here); a student with soft targets keeps kd's form."""
    import torch

    from kd import training
    from kd.training import RowMean, hard_label_loss, labeled

    def fused(hidden, weight, labels, bias=None):
        return hidden.sum()

    monkeypatch.setattr(kernels, "liger_cross_entropy", lambda device_type: fused)
    hard = {"hard": RowMean(hard_label_loss, labeled)}
    assert training._liger_hard(hard, torch.device("cpu")) is fused
    with_soft = {**hard, "soft": RowMean(lambda batch, out: out["logits"].sum(), training.all_rows)}
    assert training._liger_hard(with_soft, torch.device("cpu")) is None
