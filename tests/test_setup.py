"""The set-up keeps a learner's working torch: requirements.txt states ranges, constraints.txt the
exact versions CI tests, and a torch older than the range is named in one line before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from support import cli
from conftest import REPO, python_cmd, run, torchrun_cmd

TOO_OLD = "2.5.1+cu124"  # what a learner who skipped the install might have
TOO_OLD_LINE = f"warning: this series is tested on torch 2.11 or newer, not {TOO_OLD}; if something fails, pip install -r requirements.txt"


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, requirement_lines(REPO / "requirements.txt"))}


def constraints() -> dict[str, Version]:
    pins = {}
    for line in requirement_lines(REPO / "constraints.txt"):
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_requirements_are_ranges_starting_at_the_oldest_torch_the_scripts_accept():
    torch_req, vision_req = requirements()["torch"], requirements()["torchvision"]
    oldest = Version(".".join(map(str, cli.OLDEST_TORCH)))
    assert str(torch_req.specifier) == f"<3,>={oldest}", "torch: from the oldest tested release up to the next major"
    # torchvision 0.N is built for torch 2.(N-15): 0.26 for 2.11, 0.29 for 2.14.
    assert str(vision_req.specifier) == f"<1,>=0.{oldest.minor + 15}"
    for name, req in requirements().items():
        assert not any(spec.operator == "==" for spec in req.specifier), f"{name}: an exact pin belongs in constraints.txt"


def test_constraints_pin_every_requirement_inside_its_range():
    pins, reqs = constraints(), requirements()
    assert pins.keys() == reqs.keys(), "constraints.txt pins exactly the packages requirements.txt names"
    for name, version in pins.items():
        assert reqs[name].specifier.contains(version, prereleases=True), f"{name}=={version} is outside {reqs[name]}"
    assert pins["torchvision"].minor == pins["torch"].minor + 15, "torchvision must be the one built for the pinned torch"


@pytest.mark.parametrize(
    "version, too_old",
    [
        ("2.5.1+cu124", True),
        ("1.13.1", True),
        ("2.10.0", True),
        ("2.11.0", False),
        ("2.11.0a0+git1234abc", False),  # a source build of 2.11
        ("2.13.0+cpu", False),
        ("2.14.1+cu130", False),
        ("3.0.0", False),
    ],
)
def test_torch_release_compares_major_and_minor(version, too_old):
    assert (cli.torch_release(version) < cli.OLDEST_TORCH) is too_old


def torch_reporting(version: str, folder: Path) -> dict[str, str]:
    """An environment whose real torch reports `version`: only torch.__version__ is changed."""
    (folder / "sitecustomize.py").write_text(f"import torch\ntorch.__version__ = {version!r}\n")
    return {"PYTHONPATH": str(folder)}


@pytest.mark.parametrize("script", ["single_gpu.py", "multigpu.py", "multigpu_torchrun.py", "multinode.py", "mingpt/main.py"])
def test_too_old_torch_is_named_in_one_line_before_anything_runs(tmp_path, script):
    result = run(python_cmd(script, "--help"), tmp_path, env=torch_reporting(TOO_OLD, tmp_path))
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]
    assert result.stderr.splitlines() == [TOO_OLD_LINE]


def test_too_old_torch_is_named_once_per_job(tmp_path):
    """Not again by the processes mp.spawn starts (step 2), nor by the other ranks under torchrun (step 3)."""
    env = torch_reporting(TOO_OLD, tmp_path)
    for cmd in (python_cmd("multigpu.py", "1", "1"), torchrun_cmd("multigpu_torchrun.py", "1", "1")):
        result = run(cmd, tmp_path, env=env)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert output.count(TOO_OLD_LINE) == 1, output[-3000:]
        assert "Epoch 1/1" in output  # a warning: the step still runs


def test_torch_in_range_runs_without_a_word_about_it(tmp_path):
    installed = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=True)
    assert cli.torch_release(installed.stdout.strip()) >= cli.OLDEST_TORCH, "the torch under test is itself out of range"
    result = run(python_cmd("single_gpu.py", "--help"), tmp_path)  # the check runs on import, before the arguments
    assert result.returncode == 0 and "usage: single_gpu.py" in result.stdout, result.stderr[-3000:]
    assert result.stderr == ""
