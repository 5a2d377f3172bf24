"""No C compiler: ``pip install .`` still succeeds, without the compiled modules, and zrouter
runs its pure-Python path (setup.py marks every extension optional; zrouter/_speedups.py falls
back when one does not import). Built from a copy of the tree without earlier build output,
so nothing already compiled can slip into the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "*.c", "__pycache__", ".cache",
                               ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "results")


@pytest.mark.timeout(300)
def test_without_a_compiler_the_install_is_pure_python(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    wheels = tmp_path / "wheels"
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}  # every compile and link fails
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                   check=True, timeout=240, env=env)
    (wheel,) = wheels.glob("zrouter-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
        assert "zrouter/_native/codec.pyx" in z.namelist()  # the source ships; only the build was skipped
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=240)
    clean = {k: v for k, v in os.environ.items() if k != "ZROUTER_PURE"}
    out = subprocess.run(
        [str(py), "-c", "from zrouter import _speedups as s, protocol as p\n"
         "assert s.decode_request is p.decode_request\nprint(s.implementation()); print(s.why_pure())"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=clean,
    )
    assert out.returncode == 0, out.stderr
    impl, why = out.stdout.splitlines()[:2]
    assert impl == "pure" and "did not import" in why
