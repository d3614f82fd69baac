"""bridge.openmp: a thread's idle OpenMP pool is given back (in a child process of its own, so
that no other test's threads are counted), and torch keeps computing the same numbers after."""

import subprocess
import sys
import textwrap

import pytest

from test_cli import child_env

SCRIPT = textwrap.dedent("""
    import os, threading
    import torch
    from bridge import openmp

    def threads():
        return len(os.listdir("/proc/self/task"))

    torch.set_num_threads(2)
    x = torch.randn(64, 256, 256)
    expected = (x * 2 + 1).relu().sum().item()  # a parallel region: this thread gets a worker pool
    with_pool = threads()
    released = openmp.release_idle_workers()
    without_pool = threads()
    released &= openmp.release_idle_workers()  # nothing left to free: still fine
    again = (x * 2 + 1).relu().sum().item()  # a new pool, same numbers
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("sum", (x * 2 + 1).relu().sum().item()))
    worker.start(); worker.join()
    print(released, with_pool, without_pool, again == expected, out["sum"] == expected)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp and /proc/self/task: Linux only")
def test_the_calling_threads_openmp_pool_is_given_back_and_torch_still_computes():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                            env=child_env())
    assert result.returncode == 0, result.stderr
    released, with_pool, without_pool, same_after, same_in_thread = result.stdout.split()
    assert released == "True", "torch's libgomp was not found or has no omp_pause_resource_all"
    assert int(without_pool) < int(with_pool)  # the worker thread of the pool is gone
    assert same_after == "True" and same_in_thread == "True"

