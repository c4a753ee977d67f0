"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel (the wheel
built from the sdist, so the sdist is complete), the wheel installs into a fresh
virtualenv, and from there ``virtq --version`` and ``virtq demo --backend embedded`` work.
``py.typed`` ships, and the version has one source (``virtq/__init__.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import virtq

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build requirements (setuptools, wheel) come from the test extra,
    # so the build needs no download.  Without flags build makes the sdist, then the wheel
    # from the unpacked sdist.
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_build_makes_an_sdist_and_a_wheel_with_py_typed(dist):
    version = virtq.__version__
    wheels = list(dist.glob("virtq-*.whl"))
    sdists = list(dist.glob("virtq-*.tar.gz"))
    assert [w.name for w in wheels] == [f"virtq-{version}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"virtq-{version}.tar.gz"]
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"virtq-{version}.dist-info/METADATA").decode()
    assert "virtq/py.typed" in names
    for module in ("virtq/__init__.py", "virtq/aio/blk.py", "virtq/ringview/render.py",
                   "virtq/cli/inspect.py", "virtq/testing/embedded/server.py"):
        assert module in names
    assert not any(n.startswith(("tests/", "docs/", "examples/")) for n in names)
    assert f"\nVersion: {version}\n" in metadata
    for extra in ("async", "plot", "docs", "test", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    with tarfile.open(sdists[0]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "virtq/py.typed"} <= members


def test_the_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text
    assert 'version = { attr = "virtq.__version__" }' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]


def test_the_wheel_installs_into_a_fresh_venv_and_runs(dist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    wheel = next(dist.glob("virtq-*.whl"))
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*argv: str) -> str:
        # From an empty folder: nothing of the source tree can be imported by accident.
        done = subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True,
                              text=True, timeout=180, check=False, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert run("virtq", "--version").strip() == f"virtq {virtq.__version__}"
    where = run("python", "-c", "import virtq; print(virtq.__file__)").strip()
    assert Path(where).is_relative_to(venv)
    out = run("virtq", "demo", "--backend", "embedded", "--mib", "1")
    assert "virtq's embedded Python back-end" in out
    assert "byte-exact" in out
