"""The README cannot rot: every command on it is run or checked, and its outputs and excerpts are real.

Each fenced block of README.md follows a marker, `<!-- test: KIND -->`:

- setup: the first lines. The install and test commands must be the ones `.ci/run` runs; the
  rest runs like `cpu`.
- cpu: run with bash, in order, in one fresh copy of the repository, as a learner following the
  page would; it must exit 0. `<!-- test: cpu; run with "A" => "B" -->` runs it with A replaced by
  B, to keep long runs short.
- output: every line must appear, in this order, in what the `cpu` block before it printed.
  Numbers may differ; `...` inside a line stands for anything, and a line `...` for other lines.
- session: a console transcript. Each `$ ` command runs; the lines after it are matched against
  its output as above, and a command whose output shows `error:` must exit non-zero.
- diff: each line is a `diff -u` of two steps, which must differ.
- excerpt OLD NEW: a `diff` excerpt; its `-` lines must be lines of OLD, its `+` lines lines of NEW.
- gpu, cluster: need GPUs, or several machines or Slurm, so they are not run here. They are
  checked with `bash -n`, and every script they call with every flag and setting they pass,
  against the script's real `--help` (and torchrun's).

README.zh-CN.md must carry the same blocks, comments aside, in the same order.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

READMES = [REPO / "README.md", REPO / "README.zh-CN.md"]
BLOCK = re.compile(r'<!-- test: (\w+)([^;>]*)(?:; run with "(.*?)" => "(.*?)")? -->\n```\w*\n(.*?)^```', re.DOTALL | re.MULTILINE)
NUMBER = re.compile(r"\d[\d,.]*")
STEP_SCRIPTS = ("single_gpu.py", "multigpu.py", "multigpu_torchrun.py", "multinode.py", "fsdp.py")
SET_UP_ONLY = ("pip install", "python -m pytest")  # set-up lines that .ci/run runs itself, not this test
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # the capstone's text, where CI keeps it
# What .ci/run adds to the README's install command: the exact versions it tests, and quiet.
CI_INSTALL_EXTRA = ["-c", "constraints.txt", "--quiet", "--disable-pip-version-check"]


@dataclass
class Block:
    kind: str
    args: list[str]
    substitution: tuple[str, str] | None
    text: str
    line: int

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.kind}"


def read_blocks(path: Path) -> list[Block]:
    source = path.read_text()
    found = []
    for match in BLOCK.finditer(source):
        kind, args, old, new, text = match.groups()
        line = source.count("\n", 0, match.start()) + 1
        found.append(Block(kind, args.split(), (old, new) if old is not None else None, text, line))
    return found


BLOCKS = read_blocks(READMES[0])
RUNNABLE = [b for b in BLOCKS if b.kind in ("setup", "cpu", "output", "session")]


def commands(text: str) -> list[str]:
    """The block's commands without comments, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", "", text)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line]


def comparable(block: Block) -> tuple:
    """What both editions must share: the kind, its arguments, and the commands or text."""
    if block.kind in ("output", "excerpt"):
        return block.kind, block.args, block.substitution, block.text
    if block.kind == "session":  # only the `$ ` lines are commands; the output is checked by running
        return block.kind, commands("\n".join(l for l in block.text.splitlines() if l.startswith("$ ")))
    return block.kind, block.args, block.substitution, commands(block.text)


def line_pattern(line: str) -> re.Pattern:
    """A README output line as a pattern: numbers may differ, `...` stands for anything."""
    parts = []
    for piece in line.split("..."):
        pieces = NUMBER.split(piece)
        parts.append(r"[\d,.]+".join(re.escape(p) for p in pieces))
    return re.compile(".*".join(parts))


def assert_shown_lines_appear(shown: str, output: str, where: str) -> None:
    printed = output.splitlines()
    position = 0
    for line in shown.splitlines():
        if line.strip() in ("", "..."):
            continue
        pattern = line_pattern(line)
        while position < len(printed) and not pattern.fullmatch(printed[position]):
            position += 1
        assert position < len(printed), f"{where}: {line!r} not printed (in this order); output:\n{output[-4000:]}"
        position += 1


def learner_env() -> dict[str, str]:
    """A learner's shell: this Python's `python` and `torchrun` first on PATH, nothing preset for the scripts."""
    preset = ("TORCH", "OMP_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONUNBUFFERED")
    env = {k: v for k, v in os.environ.items() if not k.startswith(preset)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash(script: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + script], cwd=cwd, env=learner_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh copy of the repository's tracked files, as a new user would clone it."""
    folder = tmp_path_factory.mktemp("readme") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.split("\0"):
        if name and (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    # The minGPT text is downloaded into data/; where the shared copy exists, the test starts
    # from it, so that no network is needed (the download itself is tested in test_mingpt.py
    # against a local server). Where it does not, the blocks that need it are skipped.
    if SHARED_TEXT.exists():
        from mingpt.char_dataset import cached_path
        from mingpt.config import DataConfig

        target = folder / cached_path(DataConfig())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_TEXT, target)
    return folder


PRINTED: dict[str, str | None] = {}  # what the latest cpu block printed (None: it was skipped)


def needs_tiny_shakespeare(text: str) -> bool:
    """A block that trains the capstone on its default text (downloaded unless provided), or reads what that wrote."""
    return ("mingpt/main.py" in text and "data_config.path=" not in text) or "gpt_metrics.jsonl" in text


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_readme_commands_run_and_print_what_it_shows(block, checkout):
    where = f"README.md line {block.line}"
    if block.kind == "cpu" and needs_tiny_shakespeare(block.text) and not SHARED_TEXT.exists():
        PRINTED["cpu"] = None
        pytest.skip(f"needs the Tiny Shakespeare text: put it at {SHARED_TEXT} (tests never download it)")
    if block.kind == "output":
        assert "cpu" in PRINTED, f"{where}: no cpu block before this output block"
        if PRINTED["cpu"] is None:
            pytest.skip("the block before it was skipped")
        assert_shown_lines_appear(block.text, PRINTED["cpu"], where)
    elif block.kind == "session":
        run_session(block.text, checkout, where)
    else:
        script = block.text
        if block.kind == "setup":
            script = "\n".join(line for line in script.splitlines() if not line.startswith(SET_UP_ONLY))
        if block.substitution:
            old, new = block.substitution
            assert old in script, f"{where}: {old!r} is not in the block"
            script = script.replace(old, new)
        result = bash(script, checkout)
        PRINTED["cpu"] = result.stdout
        assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stdout[-4000:]}"


def run_session(text: str, cwd: Path, where: str) -> None:
    for chunk in re.split(r"^\$ ", text, flags=re.MULTILINE)[1:]:
        command, _, shown = chunk.partition("\n")
        result = bash(command, cwd)
        if "error:" in shown:
            assert result.returncode != 0, f"{where}: {command!r} should fail"
        else:
            assert result.returncode == 0, f"{where}: {command!r} exited {result.returncode}:\n{result.stdout[-3000:]}"
        assert_shown_lines_appear(shown, result.stdout, f"{where}, {command!r}")


def test_set_up_and_test_commands_are_what_ci_runs():
    setup = [b for b in BLOCKS if b.kind == "setup"]
    assert len(setup) == 1 and setup[0].line <= 3, "the README must open with the set-up block"
    install, test = "pip install -r requirements.txt", "python -m pytest"
    assert [line for line in commands(setup[0].text) if line.startswith(SET_UP_ONLY)] == [install, test]
    ci = [line for line in commands((REPO / ".ci" / "run").read_text()) if line.startswith(SET_UP_ONLY)]
    assert len(ci) == 2, f".ci/run must install once and test once: {ci}"
    assert shlex.split(ci[0]) == shlex.split(install) + CI_INSTALL_EXTRA, f".ci/run must run {install!r} plus {CI_INSTALL_EXTRA}"
    assert (REPO / "constraints.txt").is_file()
    assert ci[1].split("||")[0].strip() == test, f".ci/run must run {test!r}, as the README says"


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_every_code_block_is_marked(readme):
    fences = sum(1 for line in readme.read_text().splitlines() if line.startswith("```"))
    assert fences % 2 == 0
    marked = read_blocks(readme)
    assert len(marked) == fences // 2, f"{readme.name}: every fenced block needs a <!-- test: KIND --> marker"
    kinds = {"setup", "cpu", "output", "session", "diff", "excerpt", "gpu", "cluster"}
    assert {b.kind for b in marked} <= kinds


def test_chinese_edition_shows_the_same_commands():
    english, chinese = (read_blocks(path) for path in READMES)
    assert [comparable(b) for b in chinese] == [comparable(b) for b in english]
    assert "README.zh-CN.md" in READMES[0].read_text().split("\n## ")[0], "README.md must link the Chinese edition at the top"
    links = re.findall(r"https://blog\.csdn\.net/\S+?(?=\))", READMES[0].read_text())
    assert len(links) == 3 and all(link in READMES[1].read_text() for link in links)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "diff"], ids=lambda b: b.id)
def test_diff_commands_show_a_step_diff(block):
    for command in commands(block.text):
        result = subprocess.run(shlex.split(command), cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 1 and result.stdout.startswith("--- "), command


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "excerpt"], ids=lambda b: b.id)
def test_diff_excerpts_are_in_the_scripts(block):
    old, new = ([line.strip() for line in (REPO / name).read_text().splitlines()] for name in block.args)
    for line in block.text.splitlines():
        mark, code = line[:1], line[1:].strip()
        source = {"-": old, "+": new, " ": new}[mark]
        assert code in source, f"README.md line {block.line}: {line!r} is not in {block.args[0 if mark == '-' else 1]}"


@functools.cache
def help_text(*command: str) -> str:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=learner_env(), timeout=120)
    assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
    return result.stdout


def check_invocation(words: list[str], where: str) -> None:
    """A command line of ours: the script exists and takes every flag and setting passed."""
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VARIABLE=value before the command
        words = words[1:]
    if words[0] == "pip":  # installs: their syntax is checked, pip's own flags are pip's
        return
    if words[0] == "sbatch":
        script = next(w for w in words[1:] if not w.startswith("-"))
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
        rest = words[words.index(script) + 1 :]
        target = "mingpt/main.py" if script.startswith("mingpt/") else "multinode.py"
        defaults = re.search(r'^\[ "\$#" -gt 0 \] \|\| set -- (.*)$', (REPO / script).read_text(), re.MULTILINE)
        if not rest and defaults:  # the script's own arguments when given none
            rest = defaults.group(1).split()
        check_invocation(["python", target, *rest], where)  # the script passes its arguments on
        return
    if words[0] == "torchrun":
        script_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        for flag in words[1:script_at]:
            assert flag.split("=")[0] in help_text(sys.executable, "-m", "torch.distributed.run", "--help"), f"{where}: torchrun {flag}"
        words = ["python", *words[script_at:]]
    if words[0] == "bash":
        assert subprocess.run(["bash", "-n", str(REPO / words[1])]).returncode == 0, f"{where}: {words[1]}"
        return
    assert words[0] == "python", f"{where}: unexpected command {words[0]}"
    script = words[1].replace("$repo/", "")
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    usage = help_text(sys.executable, str(REPO / script), "--help")
    for word in words[2:]:
        if word.startswith("--"):
            assert re.search(rf"{re.escape(word.split('=')[0])}\b", usage), f"{where}: {script} has no {word}"
        elif "=" in word:  # a minGPT setting: its --help lists every one
            assert f"  {word.split('=')[0]}=" in usage, f"{where}: {script} has no setting {word}"
    if script in STEP_SCRIPTS:
        positional = [w for i, w in enumerate(words[2:]) if not w.startswith("-") and not words[1 + i].startswith("--")]
        assert len(positional) in (0, 2) and all(w.isdigit() for w in positional), f"{where}: {script} takes [total_epochs save_every]"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind in ("gpu", "cluster")], ids=lambda b: b.id)
def test_gpu_and_cluster_commands_match_the_scripts(block):
    where = f"README.md line {block.line}"
    assert subprocess.run(["bash", "-n", "-c", block.text]).returncode == 0, f"{where}: bash syntax"
    for command in commands(block.text):
        words = shlex.split(command)
        if words[0] == "export":
            continue
        check_invocation(words, where)
