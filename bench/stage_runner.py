"""Run one `kd` command in this fresh process; print its wall time and peak RSS as JSON.

    python bench/stage_runner.py label --prepared ... --out ...

The last stdout line is {"seconds", "peak_rss_mb", "rss_after_imports_mb", "exit_code"}: seconds
count the command alone (imports excluded); peak RSS is this process's VmHWM, imports included
(that is what a user's `kd` process holds), with the after-imports figure to subtract. Not
ru_maxrss: Linux carries it over exec from the forking parent, so a child of a big bench process
would report the parent's size. The environment variable KD_BENCH_THREADS, if set, fixes torch's
thread count first.
"""

from __future__ import annotations

import json
import os
import sys
import time

from kd.cli import app


def high_water_mb() -> float:
    """Peak resident set size of this process image (VmHWM of /proc/self/status), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> int:
    if os.environ.get("KD_BENCH_THREADS"):  # the bench's --threads, so both sizes run alike
        import torch

        torch.set_num_threads(int(os.environ["KD_BENCH_THREADS"]))
    after_imports = high_water_mb()
    started = time.perf_counter()
    code = app(sys.argv[1:], standalone_mode=False, prog_name="kd")
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "peak_rss_mb": high_water_mb(), "rss_after_imports_mb": after_imports,
                      "exit_code": int(code or 0)}))
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
