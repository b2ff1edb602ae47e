"""The set-up bootstrap (scripts/_uv.sh) on a PEP 668 "externally managed" Python with a clean HOME and no uv.

An externally managed Python is built the way distributions mark theirs: a Python installation (not a venv) whose
stdlib directory holds an ``EXTERNALLY-MANAGED`` file. The fake one here is a copy of this interpreter's binary in
a fresh prefix whose ``lib/pythonX.Y`` links every stdlib entry of the real one and adds the marker, so pip
refuses ``pip install --user uv`` exactly as Debian 12's does (checked first, so the simulation cannot silently
stop being faithful). Without ``ensurepip`` it is also a Debian without ``python3-venv``.

The fast tests install a stub ``uv`` wheel from a local folder (no network); the slow one installs the real uv
from PyPI with the machine's own externally managed python3 when there is one (``/usr/bin/python3`` on Debian).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB_VERSION = "0.0.1"
MARKER_TEXT = "[externally-managed]\nError=This Python is managed by the test's fake distribution.\n"


def _base_python() -> tuple[Path, Path, Path]:
    """(binary, prefix, stdlib dir) of the real Python installation under this interpreter (not the venv)."""
    prefix = Path(sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": sys.base_prefix})["stdlib"])
    if not (stdlib / "os.py").is_file():
        stdlib = prefix / "lib" / ver
    exe = Path(getattr(sys, "_base_executable", "") or sys.executable).resolve()
    if not exe.is_file() or Path(sys.prefix) in exe.parents:
        exe = (prefix / "bin" / ver).resolve()
    return exe, prefix, stdlib


def make_externally_managed_python(dest: Path, with_ensurepip: bool = True) -> Path:
    """A Python installation at ``dest`` (not a venv) whose stdlib holds an EXTERNALLY-MANAGED marker."""
    exe, prefix, stdlib = _base_python()
    if not (stdlib / "os.py").is_file():
        pytest.skip(f"cannot find the stdlib of {prefix}")
    ver = stdlib.name
    (dest / "bin").mkdir(parents=True)
    lib = dest / "lib"
    lib.mkdir()
    for entry in (prefix / "lib").iterdir():  # libpython*.so for shared builds (rpath $ORIGIN/../lib)
        if entry.name != ver:
            (lib / entry.name).symlink_to(entry)
    (lib / ver).mkdir()
    for entry in stdlib.iterdir():
        if entry.name == "EXTERNALLY-MANAGED" or (entry.name == "ensurepip" and not with_ensurepip):
            continue
        (lib / ver / entry.name).symlink_to(entry)
    (lib / ver / "EXTERNALLY-MANAGED").write_text(MARKER_TEXT)
    py = dest / "bin" / "python3"
    shutil.copy2(exe, py)  # a copy, not a link: Python finds its prefix from where the binary lies
    (dest / "bin" / ver).symlink_to("python3")
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "import sys, sysconfig; print(sys.prefix == sys.base_prefix, sysconfig.get_path('stdlib'))",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(dest)},
    )
    if probe.returncode != 0 or probe.stdout.split()[:1] != ["True"]:
        pytest.skip(f"cannot relocate this Python for the test: {probe.stdout} {probe.stderr}")
    assert Path(probe.stdout.split()[1]).resolve() == (lib / ver).resolve()
    return py


def _stub_uv_wheel(folder: Path) -> Path:
    """A wheel named ``uv`` whose script ``uv`` prints a version line (stands in for PyPI's uv, offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"uv-{STUB_VERSION}"
    files = {
        f"{name}.data/scripts/uv": f'#!/bin/sh\necho "uv {STUB_VERSION} (spar test stub)"\n',
        f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: uv\nVersion: {STUB_VERSION}\n",
        f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: spar-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}.dist-info/RECORD,,")
    files[f"{name}.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            info = zipfile.ZipInfo(path)
            info.external_attr = (
                0o100755 if "/scripts/" in path else 0o100644
            ) << 16  # regular file; pip keeps x
            z.writestr(info, text)
    return whl


def _clean_env(home: Path, py: Path, **extra: str) -> dict[str, str]:
    """A clean HOME and a PATH with ``py`` as python3 and no uv."""
    if shutil.which("uv", path="/usr/bin:/bin"):
        pytest.skip("uv is installed system-wide here; the bootstrap would not run")
    env = {"HOME": str(home), "PATH": f"{py.parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def _bootstrap(env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    script = "source scripts/_uv.sh && command -v uv && uv --version"
    return subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**env, "SPAR_UV_BOOTSTRAP_ONLY": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_refused_like_debian(py: Path, home: Path) -> None:
    """The simulated Python refuses a user install the way a PEP 668 distribution does."""
    has_pip = subprocess.run([str(py), "-c", "import pip"], capture_output=True).returncode == 0
    if not has_pip:
        pytest.skip("the base Python has no pip")
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "--user", "--no-index", "uv"],
        capture_output=True,
        text=True,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode != 0
    assert "externally-managed-environment" in r.stdout + r.stderr


def test_bootstrap_private_venv_on_externally_managed_python(tmp_path: Path) -> None:
    py = make_externally_managed_python(tmp_path / "sys")
    home = tmp_path / "home"
    home.mkdir()
    _assert_refused_like_debian(py, home)
    wheels = tmp_path / "wheels"
    _stub_uv_wheel(wheels)
    env = _clean_env(home, py, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    r = _bootstrap(env)
    assert r.returncode == 0, r.stderr
    uv_path, version = r.stdout.strip().splitlines()[-2:]
    assert Path(uv_path) == home / ".cache" / "spar" / "uv" / "venv" / "bin" / "uv"
    assert version == f"uv {STUB_VERSION} (spar test stub)"
    assert not (home / ".local").exists()  # nothing went into the user site
    r2 = _bootstrap(env)  # second time: found, not reinstalled
    assert r2.returncode == 0 and "installing" not in r2.stderr


def test_bootstrap_without_venv_module_uses_pip_target(tmp_path: Path) -> None:
    py = make_externally_managed_python(tmp_path / "sys", with_ensurepip=False)  # Debian without python3-venv
    home = tmp_path / "home"
    home.mkdir()
    _assert_refused_like_debian(py, home)
    wheels = tmp_path / "wheels"
    _stub_uv_wheel(wheels)
    r = _bootstrap(_clean_env(home, py, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels)))
    assert r.returncode == 0, r.stderr
    uv_path, version = r.stdout.strip().splitlines()[-2:]
    assert Path(uv_path) == home / ".cache" / "spar" / "uv" / "pkgs" / "bin" / "uv"
    assert version == f"uv {STUB_VERSION} (spar test stub)"


def test_bootstrap_reports_failure_clearly(tmp_path: Path) -> None:
    py = make_externally_managed_python(tmp_path / "sys", with_ensurepip=False)
    home = tmp_path / "home"
    home.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _clean_env(home, py, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty))
    env["PATH"] = f"{py.parent}:{_tools_without_downloaders(tmp_path)}"
    r = _bootstrap(env)
    assert r.returncode != 0
    assert "could not install uv" in r.stderr


def _tools_without_downloaders(tmp_path: Path) -> str:
    """A PATH folder with the shell tools the script needs but no curl/wget (so no installer is reachable)."""
    d = tmp_path / "tools"
    d.mkdir()
    for tool in ("bash", "sh", "env", "mkdir", "rm", "dirname", "cat"):
        found = shutil.which(tool, path="/usr/bin:/bin")
        if found:
            (d / tool).symlink_to(found)
    return str(d)


@pytest.mark.slow
def test_bootstrap_real_uv_from_pypi_with_system_python(tmp_path: Path) -> None:
    """The real thing: the distribution's python3 when it is externally managed (else the fake one), real PyPI."""
    system = Path("/usr/bin/python3")
    marker_probe = (
        subprocess.run(
            [
                str(system),
                "-c",
                "import sysconfig, os; print(os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))",
            ],
            capture_output=True,
            text=True,
        )
        if system.exists()
        else None
    )
    if marker_probe is not None and marker_probe.stdout.strip() == "True":
        bindir = tmp_path / "sysbin"
        bindir.mkdir()
        (bindir / "python3").symlink_to(system)
        py = bindir / "python3"
    else:
        py = make_externally_managed_python(tmp_path / "sys")
    home = tmp_path / "home"
    home.mkdir()
    _assert_refused_like_debian(py, home)
    r = _bootstrap(_clean_env(home, py), timeout=600)
    assert r.returncode == 0, r.stderr
    uv_path, version = r.stdout.strip().splitlines()[-2:]
    assert Path(uv_path).is_relative_to(home / ".cache" / "spar" / "uv")
    assert version.startswith("uv ") and "stub" not in version
