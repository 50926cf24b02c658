"""The install files agree with each other, the scripts refuse an unsupported Python in one line,
and CI runs the commands the README gives."""

import json
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11 on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def pyproject():
    return tomllib.loads(read("pyproject.toml"))


def requirement_lines(name):
    """The requirement lines of a pip requirements file, without comments and pip options."""
    lines = [line.split(" #")[0].strip() for line in read(name).splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def comparable(requirement_text):
    """A requirement as (name, versions, marker), so spelling differences do not count."""
    r = Requirement(requirement_text)
    return canonicalize_name(r.name), SpecifierSet(str(r.specifier)), str(r.marker) if r.marker else ""


def test_requirements_txt_lists_exactly_pyproject_dependencies():
    from_pip = sorted(map(comparable, requirement_lines("requirements.txt")), key=str)
    from_pyproject = sorted(map(comparable, pyproject()["project"]["dependencies"]), key=str)
    assert from_pip == from_pyproject


def test_dev_requirements_are_the_runtime_ones_plus_pytest_and_a_torch_pyproject_allows():
    assert "-r requirements.txt" in read("requirements-dev.txt").splitlines()
    dev = {canonicalize_name(Requirement(line).name): Requirement(line) for line in requirement_lines("requirements-dev.txt")}
    assert set(dev) == {"pytest", "torch"}
    assert [Requirement(r).name for r in pyproject()["dependency-groups"]["dev"]] == ["pytest"]
    pinned = next(iter(dev["torch"].specifier)).version
    allowed = next(Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert allowed.specifier.contains(pinned)


# Runs a script's top with a given Python version pretended: the guard either exits, or lets the
# script go on to `import gymnasium`, which fails here on purpose so that nothing heavy loads.
PRETEND = """
import io, json, runpy, sys
script, minor = sys.argv[1], int(sys.argv[2])
sys.version_info = (3, minor, 0, "final", 0)
sys.modules["numpy"] = None  # the first import past run_utils' version check
sys.argv = [script]
sys.stderr = io.StringIO()
try:
    runpy.run_path(script, run_name="__main__")
    outcome = "ran"
except SystemExit as e:
    outcome = e.code
except ImportError as e:
    outcome = "import " + str(e.name)
print(json.dumps({"outcome": outcome, "stderr": sys.stderr.getvalue()}))
"""


@pytest.mark.parametrize("script", ["ppo.py", "drac.py", "mdpo.py"])
def test_scripts_refuse_a_python_outside_pyprojects_range_in_one_line(script):
    supported = SpecifierSet(pyproject()["project"]["requires-python"])
    for minor in range(8, 16):
        done = subprocess.run([sys.executable, "-c", PRETEND, script, str(minor)], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        if supported.contains(f"3.{minor}.0"):
            assert result == {"outcome": "import numpy", "stderr": ""}, minor
        else:
            assert result["outcome"] == 2, minor
            message = result["stderr"]
            assert message.startswith(f"error: Python 3.{minor} ") and message.count("\n") == 1, message
            assert f"uv run {script}" in message and "3.10 to 3.12" in message, message


def readme_commands():
    """The shell lines of the README's code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)
    return "\n".join(blocks)


def test_ci_installs_and_tests_with_the_readmes_commands():
    ci = read(".ci/run")
    for command in ("pip install -r requirements-dev.txt", "python -m pytest -q tests"):
        assert command in readme_commands(), command
        assert re.search(rf"^{re.escape(command)}$", ci, flags=re.M), command


@pytest.mark.parametrize("document", ["README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")))
def test_relative_links_point_at_files_that_exist(document):
    text = read(document)
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "no relative links found: the pattern no longer matches the document"
    here = os.path.dirname(os.path.join(ROOT, document))
    missing = [t for t in local if not os.path.exists(os.path.join(here, t))]
    assert not missing
