"""glibc's allocator keeps the memory a process frees (``opdcells.console.keep_allocated_memory``)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from opdcells.console import ALLOCATOR_ENVIRONMENT, ALLOCATOR_SWITCH, allocator_environment

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's mallopt only")

#: A child that applies the settings, then allocates, touches and frees buffers of 8-9 MB 20 times (as a
#: training step does its activations) and reports its minor page faults.
_CHILD = """
import json, resource, numpy as np
from opdcells.console import keep_allocated_memory
applied = keep_allocated_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    np.ones((1 << 20) + 512 * i).sum()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _child(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT and k != ALLOCATOR_SWITCH}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**env, **extra}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.splitlines()[-1])


@glibc
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    kept = _child()
    default = _child(**{ALLOCATOR_SWITCH: "default"})
    assert kept["applied"] == ALLOCATOR_ENVIRONMENT
    assert default["applied"] == {}
    # every buffer mapped anew: thousands of faults (NumPy asks for 2 MB pages; TensorFlow's buffers fault
    # in 4 KB pages); reused: the pages of the first buffer only
    assert default["faults"] > 2_000
    assert kept["faults"] < default["faults"] / 10


@glibc
def test_a_variable_the_user_set_leaves_the_allocator_alone():
    assert _child(MALLOC_ARENA_MAX="4")["applied"] == {}


def test_child_processes_get_the_settings_unless_the_user_chose():
    assert allocator_environment({})  == ALLOCATOR_ENVIRONMENT
    assert allocator_environment({"MALLOC_TOP_PAD_": "0"}) == {"MALLOC_TOP_PAD_": "0"}
    assert allocator_environment({ALLOCATOR_SWITCH: "default"}) == {ALLOCATOR_SWITCH: "default"}


def test_notebook_kernels_start_with_the_settings():
    from opdcells.notebooks import kernel_environment

    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT}
    assert ALLOCATOR_ENVIRONMENT.items() <= kernel_environment(env).items()
    assert "MALLOC_ARENA_MAX" not in kernel_environment({**env, ALLOCATOR_SWITCH: "default"})
