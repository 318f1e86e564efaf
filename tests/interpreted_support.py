"""Running Triton kernels on CPU in Triton's interpreter, for tests of the kernels' arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(code: str, timeout: int = 600) -> None:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before Triton is first
    imported, so not in this process); the code prints "ok" at its end when every check passed."""
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)  # the code may import test modules, as `tests.x` or (as pytest does) `x`
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=root)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
