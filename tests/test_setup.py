"""The set-up a new user and CI run: the README's commands, .ci/run and requirements.lock agree,
and the lock pins every dependency at a version pyproject.toml's ranges allow."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import ROOT

INSTALL = 'pip install -c requirements.lock -e ".[dev]"'
TEST = "python -m pytest -q -n 2 --dist loadfile"


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"requirements.lock: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match[2])
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(r) for r in names]


def test_readme_and_ci_run_the_same_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    setup = readme[readme.index("## Set-up") : readme.index("## Training")]
    assert f"{INSTALL} && python -m mtp_dist.demo" in setup
    assert f"\n{TEST}\n" in setup
    # The same install, its output trimmed of this machine's pip-configuration noise.
    assert 'pip_install() { pip install "$@" 2>' in ci
    assert INSTALL.replace("pip install", "pip_install --quiet") in ci
    assert f"\n{TEST}\n" in ci
    # CI installs into a new environment, the old one removed first.
    assert ci.index('rm -rf "$venv"') < ci.index('python3 -m venv "$venv"') < ci.index(INSTALL[:11])


def test_the_lock_pins_every_dependency_within_its_range():
    pins = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is a dependency but requirements.lock does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}"
        )
    # The transitive ones too: more pins than direct dependencies (torch alone brings six).
    assert len(pins) > len(_requirements()) + 20
    assert "mtp-dist" not in pins, "the project itself is installed from the checkout"
