"""Installing s6tls as the README says: the wheel, the sdist, pipx; commands and manual pages.

Each install goes into a fresh directory under tmp_path; the installed
``s6tls demo`` runs the installed programs, and ``man -w`` finds the pages
with no MANPATH, the way man-db finds them next to a directory of PATH.
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = ("s6-tlsd", "s6-tlsc", "s6-tlsserver", "s6-tlsclient", "s6-dtlsserver", "s6-dtlsclient")
QUIET = ["-q", "--disable-pip-version-check"]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert res.returncode == 0, (argv, res.stdout, res.stderr)
    return res


def user_env(bindir: Path) -> dict[str, str]:
    """A user's environment with ``bindir`` first on PATH and no MANPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    return env


def readme_commands() -> list[str]:
    """The commands the README says each install holds, as many as its number word says."""
    text = " ".join((ROOT / "README.md").read_text().split())
    match = re.search(r"Each install holds (\w+) commands, (.*?) \(", text)
    assert match, "README.md does not say which commands an install holds"
    named = re.findall(r"`([^`]+)`", match[2])
    assert NUMBERS.index(match[1]) == len(named), match[0]
    return named


NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def test_the_readme_names_every_command_and_only_them():
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert sorted(readme_commands()) == sorted(scripts)


def check_installed(bindir: Path) -> None:
    """The README's commands are there, the demo works with the installed programs, and
    man finds every page."""
    assert [name for name in readme_commands() if not (bindir / name).exists()] == []
    env = user_env(bindir)
    demo = run([str(bindir / "s6tls"), "demo"], env=env)
    assert "s6tls demo: success" in demo.stdout
    version = run([str(bindir / "s6-tlsserver"), "--version"], env=env)
    assert version.stdout == "s6-tlsserver (s6tls) 0.1.0\n"
    for page in PAGES:
        found = run(["man", "-w", page], env=env).stdout.strip()
        assert found.endswith(f"/man1/{page}.1"), found
    for section, page in (("3", "s6tls-engine"), ("7", "s6tls-ktls")):
        found = run(["man", "-w", section, page], env=env).stdout.strip()
        assert found.endswith(f"/man{section}/{page}.{section}"), found


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as ``python -m build`` makes them."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)])
    (sdist,) = out.glob("s6tls-*.tar.gz")
    (wheel,) = out.glob("s6tls-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_and_wheel_hold_the_manual_the_license_and_its_spdx_name(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {f"man/{p}.1" for p in PAGES} | {"man/s6tls-engine.3", "man/s6tls-ktls.7"} <= names
    assert "LICENSE" in names
    assert {"tests/conftest.py", "tests/server_helpers.py", "scripts/install"} <= names
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = wheel.read(meta).decode()
    data = "s6tls-0.1.0.data/data/share/man"
    assert {f"{data}/man1/{p}.1" for p in PAGES} <= names
    assert {f"{data}/man3/s6tls-engine.3", f"{data}/man7/s6tls-ktls.7"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: ISC\n" in metadata
    assert "Permission to use, copy, modify" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_each_artifact_installs_into_a_fresh_venv_with_its_manual_pages(kind, dist, tmp_path):
    venv = tmp_path / "venv"
    bindir = venv / "bin"
    assert subprocess.run(["man", "-w", "s6-tlsserver"], env=user_env(bindir)).returncode != 0
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    pip = [sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", *QUIET]
    run([*pip, str(dist[kind])])
    check_installed(bindir)


def test_pipx_install_puts_the_commands_and_the_manual_on_the_users_paths(tmp_path):
    home = tmp_path / "home"
    env = {
        **os.environ,
        "PIPX_HOME": str(home / "pipx"),
        "PIPX_BIN_DIR": str(home / ".local/bin"),
        "PIPX_MAN_DIR": str(home / ".local/share/man"),
    }
    run([sys.executable, "-m", "pipx", "install", str(ROOT)], env=env)
    check_installed(home / ".local/bin")


BIN_SCRIPTS = sorted(p.name for p in (ROOT / "bin").iterdir() if p.name.startswith("s6"))


@pytest.mark.parametrize("name", BIN_SCRIPTS)
def test_bin_scripts_run_with_the_checkouts_venv_or_say_in_one_line_it_is_missing(name, tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "bin", checkout / "bin")
    (checkout / "s6tls").symlink_to(ROOT / "s6tls")
    script = str(checkout / "bin" / name)
    system_python = {**os.environ, "PATH": "/usr/bin:/bin"}  # whatever python3 is there
    res = subprocess.run(
        ["python3", script, "--version"], env=system_python, capture_output=True, text=True
    )
    assert (res.returncode, res.stdout) == (111, "")
    assert res.stderr == f"{name}: fatal: no {checkout}/.venv: run ./scripts/install first\n"
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    res = run(["python3", script, "--version"], env=system_python)
    assert res.stdout.startswith(f"{name} ") and res.stdout.endswith(" 0.1.0\n")
