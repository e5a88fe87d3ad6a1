"""TensorFlow's environment (``opdcells.console.TENSORFLOW_ENVIRONMENT``): oneDNN's CPU kernels on and its
start-up lines quiet, set by ``import opdcells`` before TensorFlow loads; the user's values win."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from opdcells.console import TENSORFLOW_ENVIRONMENT, tensorflow_environment

#: A child that imports opdcells, then TensorFlow, and reports the variables and whether TensorFlow
#: really runs oneDNN's kernels (its own switch, read once at import).
_CHILD = f"""
import json, os
import opdcells
from tensorflow.python.util import _pywrap_util_port
names = {sorted(TENSORFLOW_ENVIRONMENT)!r}
print(json.dumps({{"onednn": bool(_pywrap_util_port.IsMklEnabled()),
                  "env": {{k: os.environ.get(k) for k in names}}}}))
"""


def _child(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TENSORFLOW_ENVIRONMENT}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**env, **extra}, capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.splitlines()[-1])


def test_defaults_fill_in_only_what_is_unset():
    assert tensorflow_environment({}) == TENSORFLOW_ENVIRONMENT
    assert tensorflow_environment({"TF_ENABLE_ONEDNN_OPTS": "0"})["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert tensorflow_environment({"TF_CPP_MIN_LOG_LEVEL": "0"})["TF_CPP_MIN_LOG_LEVEL"] == "0"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN's switch is TensorFlow's on x86-64")
def test_import_opdcells_turns_onednn_on_and_the_user_can_turn_it_off():
    on = _child()
    assert on["onednn"] and on["env"] == TENSORFLOW_ENVIRONMENT
    off = _child(TF_ENABLE_ONEDNN_OPTS="0")
    assert not off["onednn"] and off["env"]["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_notebook_kernels_start_with_it():
    from opdcells.notebooks import kernel_environment

    env = {k: v for k, v in os.environ.items() if k not in TENSORFLOW_ENVIRONMENT}
    assert TENSORFLOW_ENVIRONMENT.items() <= kernel_environment(env).items()
    assert kernel_environment({**env, "TF_ENABLE_ONEDNN_OPTS": "0"})["TF_ENABLE_ONEDNN_OPTS"] == "0"
