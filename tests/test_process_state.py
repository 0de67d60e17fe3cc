"""The conftest guard fails a test that leaves torch's thread count or default dtype changed,
and the bench restores what it sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd.speed import torch_threads

pytestmark = pytest.mark.integration

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize("body,named", [
    ("torch.set_num_threads(1 if torch.get_num_threads() != 1 else 2)", "torch threads"),
    ("torch.set_default_dtype(torch.float64)", "torch default dtype"),
    ("os.environ['KD_LEAKED'] = '1'", "KD_LEAKED"),
])
def test_the_guard_fails_a_test_that_leaks_process_state(pytester: pytest.Pytester, body: str, named: str) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_leak=f"import os, torch\n\ndef test_leaks():\n    {body}\n\n"
                                  "def test_next_sees_it_restored():\n"
                                  "    assert torch.get_default_dtype() == torch.float32\n"
                                  "    assert 'KD_LEAKED' not in os.environ\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)  # the leaking test passes its body, then errors in teardown
    result.stdout.fnmatch_lines([f"*left process-wide state changed*{named}*"])


def test_the_guard_passes_a_test_that_restores(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_clean="from kd.speed import torch_threads\n\n"
                                   "def test_restores():\n    with torch_threads(1):\n        pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_bench_restores_the_thread_count(tmp_path: Path) -> None:
    from bench.run import bench

    with torch_threads(2):
        bench(out=None, only=["size"], students=[], rows=60, size_rows=30, threads=1, workdir=tmp_path,
              log=lambda *_: None)
        assert torch.get_num_threads() == 2
