"""Build hook: ship `examples/` and `docs/` inside the wheel as `tuneforge/_shipped/`.

All project metadata lives in pyproject.toml. `tuneforge fetch` reads these copies when tuneforge is
installed from a wheel; a source checkout (or an editable install) reads the repository folders directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("examples", "docs", "deepspeed_configs")


class BuildPyWithShipped(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for name in SHIPPED:
            src = root / name
            if not src.is_dir():
                continue
            dst = Path(self.build_lib) / "tuneforge" / "_shipped" / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithShipped})
