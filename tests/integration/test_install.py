"""The wheel installs under one name: ``zrouter.*`` imports, ``client``/``worker``/``broker`` do not.

Built with ``pip wheel`` from this tree and installed into a fresh venv (dependencies come from
the pip cache the suite's own install filled), so what a user gets from ``pip install .`` is what
is checked, not the editable install the rest of the suite runs on.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_wheel_installs_under_one_name(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, timeout=240)
    (wheel,) = wheels.glob("zrouter-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=240)
    # Run from an empty folder so this checkout's top-level broker/, worker/, client/ are not on the path.
    work = tmp_path / "elsewhere"
    work.mkdir()
    ok = subprocess.run(
        [str(py), "-c", "import zrouter.client, zrouter.worker, zrouter.broker, zrouter.protocol, zrouter.errors;"
         "from zrouter.client import Client; from zrouter.worker import Worker; print('ok')"],
        cwd=work, capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    for name in ("client", "worker", "broker"):
        gone = subprocess.run([str(py), "-c", f"import {name}"], cwd=work, capture_output=True, text=True, timeout=60)
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, (name, gone.stdout, gone.stderr)
    for script in ("zrouter-broker", "zrouter-worker", "zrouter-keys"):
        out = subprocess.run([str(env_dir / "bin" / script), "--help"], cwd=work, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and script in out.stdout, out.stderr
    out = subprocess.run([str(py), "-m", "zrouter.broker", "--help"], cwd=work, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "zrouter-broker" in out.stdout, out.stderr
