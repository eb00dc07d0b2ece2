"""OpenMP's wait policy is in the environment before PyTorch loads (models/__init__.py says why:
once a second thread ran PyTorch work, every Tab press was ~45 % slower without it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Records the environment at the moment `import torch` starts, then imports the entry module.
PROBE = """
import importlib, importlib.abc, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = (os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"))
        return None
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
import torch  # noqa: F401  (an entry point that never loads torch records it here)
print(seen["policy"])
"""


@pytest.mark.parametrize("entry", ["app", "editor.ui", "bench.latency", "bench.load", "bench.personalize", "models.engine"])
def test_the_wait_policy_is_set_before_torch_loads(entry):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE, entry], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "('ACTIVE', '300000')"


def test_an_operators_own_setting_wins():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", PROBE, "models.engine"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("('PASSIVE'")
