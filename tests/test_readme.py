"""The pages cannot rot: every command on README.md and docs/*.md is run or checked, and their outputs and excerpts are real.

Each fenced block of a page follows a marker, `<!-- test: KIND -->`:

- setup: the first lines of README.md. The install and test commands must be the ones `.ci/run`
  runs; the rest runs like `cpu`, except a command that a `cpu` block further down runs as shown (the
  main job, step 1's command): it runs there, once.
- cpu: run with bash, in order, in one fresh copy of the repository per page, as a learner following
  the page would; it must exit 0. `<!-- test: cpu; run with "A" => "B" -->` runs it with A replaced
  by B, to keep long runs short.
- output: every line must appear, in this order, in what the `cpu` block before it printed. A
  number must be printed as shown, except one written `~N` (about N: any number), whose value
  depends on the machine (times, shares, throughput, the last digits of a loss); `...` inside a
  line stands for anything, and a line `...` for other lines.
- session: a console transcript. Each `$ ` command runs; the lines after it are matched against
  its output as above, and a command whose output shows `error:` must exit non-zero.
- diff: each line is a `diff -u` of two steps, which must differ.
- excerpt OLD NEW: a `diff` excerpt; its `-` lines must be lines of OLD, its `+` lines lines of NEW.
- gpu, cluster: need GPUs, or several machines or Slurm, so they are not run here. They are
  checked with `bash -n`, and every script they call is given its arguments as torchrun's and the
  script's own parsers read them (`CLI_PARSE_ONLY=1`: parse, check, exit).

Each page's Chinese edition (NAME.zh-CN.md) must carry the same blocks, comments aside, in the same order.
One test runs a page from top to bottom, so no test depends on another's files or output.
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

PAGES = [REPO / "README.md", *sorted(path for path in (REPO / "docs").glob("*.md") if not path.name.endswith(".zh-CN.md"))]
BLOCK = re.compile(r'<!-- test: (\w+)([^;>]*)(?:; run with "(.*?)" => "(.*?)")? -->\n```\w*\n(.*?)^```', re.DOTALL | re.MULTILINE)
APPROXIMATE = re.compile(r"~\d[\d,.]*")  # `~12.03`: about 12.03, any number
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


def read_blocks(path: Path) -> list[Block]:
    source = path.read_text()
    found = []
    for match in BLOCK.finditer(source):
        kind, args, old, new, text = match.groups()
        line = source.count("\n", 0, match.start()) + 1
        found.append(Block(kind, args.split(), (old, new) if old is not None else None, text, line))
    return found


def chinese(page: Path) -> Path:
    return page.with_name(page.stem + ".zh-CN.md")


def blocks_of_kind(*kinds: str) -> list[tuple[Path, Block]]:
    return [(page, block) for page in PAGES for block in read_blocks(page) if block.kind in kinds]


def block_id(item: tuple[Path, Block]) -> str:
    page, block = item
    return f"{page.relative_to(REPO)}:{block.line}"


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
        return block.kind, commands("\n".join(line for line in block.text.splitlines() if line.startswith("$ ")))
    return block.kind, block.args, block.substitution, commands(block.text)


def line_pattern(line: str) -> re.Pattern:
    """A shown output line as a pattern: numbers as shown, `~N` any number, `...` anything."""
    parts = []
    for piece in line.split("..."):
        exact = APPROXIMATE.split(piece)
        parts.append(r"[\d,.]+".join(re.escape(part) for part in exact))
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
    preset = ("TORCH", "OMP_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONUNBUFFERED", "CLI_PARSE_ONLY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(preset)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash(script: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + script], cwd=cwd, env=learner_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip


def fresh_checkout(folder: Path) -> Path:
    """A copy of the repository's tracked files, as a new user would clone it. Where the shared copy of
    the minGPT text exists, it is put where the capstone downloads it to, so that no network is needed
    (the download itself is tested in test_mingpt.py against a local server)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.split("\0"):
        if name and (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    if SHARED_TEXT.exists():
        from mingpt.char_dataset import cached_path
        from mingpt.config import DataConfig

        target = folder / cached_path(DataConfig())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_TEXT, target)
    return folder


def needs_tiny_shakespeare(text: str) -> bool:
    """A block that trains the capstone on its default text (downloaded unless provided), or reads what that wrote."""
    return ("mingpt/main.py" in text and "data_config.path=" not in text) or "gpt_metrics.jsonl" in text or "gpt_snapshot.pt" in text


def run_block(block: Block, cwd: Path, where: str, run_later: set[str] = frozenset()) -> str:
    """Run a setup or cpu block as the page shows it (with its substitution); return what it printed.
    A setup line that a cpu block further down runs again (the main job: step 1) runs there only."""
    script = block.text
    if block.kind == "setup":
        script = "\n".join(line for line in commands(script) if not line.startswith(SET_UP_ONLY) and line not in run_later)
    if block.substitution:
        old, new = block.substitution
        assert old in script, f"{where}: {old!r} is not in the block"
        script = script.replace(old, new)
    result = bash(script, cwd)
    assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stdout[-4000:]}"
    return result.stdout


def commands_run_after(blocks: list[Block], index: int) -> set[str]:
    """The commands that the cpu blocks after blocks[index] will run as shown."""
    runs = [b for b in blocks[index + 1 :] if b.kind == "cpu" and not b.substitution and (SHARED_TEXT.exists() or not needs_tiny_shakespeare(b.text))]
    return {line for block in runs for line in commands(block.text)}


def run_session(text: str, cwd: Path, where: str) -> None:
    for chunk in re.split(r"^\$ ", text, flags=re.MULTILINE)[1:]:
        command, _, shown = chunk.partition("\n")
        result = bash(command, cwd)
        if "error:" in shown:
            assert result.returncode != 0, f"{where}: {command!r} should fail"
        else:
            assert result.returncode == 0, f"{where}: {command!r} exited {result.returncode}:\n{result.stdout[-3000:]}"
        assert_shown_lines_appear(shown, result.stdout, f"{where}, {command!r}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_page_commands_run_and_print_what_the_page_shows(page, tmp_path):
    checkout = fresh_checkout(tmp_path / "repo")
    printed: str | None = ""  # what the latest cpu block printed; None: it was skipped; "": no cpu block yet
    ran, skipped = 0, []
    blocks = read_blocks(page)
    for index, block in enumerate(blocks):
        where = f"{page.name} line {block.line}"
        if block.kind in ("setup", "cpu"):
            if needs_tiny_shakespeare(block.text) and not SHARED_TEXT.exists():
                printed = None
                skipped.append(block.line)
                continue
            printed = run_block(block, checkout, where, run_later=commands_run_after(blocks, index))
            ran += 1
        elif block.kind == "output":
            assert printed != "", f"{where}: an output block needs a cpu block before it"
            if printed is not None:  # the output of a skipped block is skipped with it
                assert_shown_lines_appear(block.text, printed, where)
        elif block.kind == "session":
            run_session(block.text, checkout, where)
            ran += 1
    if skipped:
        pytest.skip(
            f"{page.name}: {ran} blocks ran and printed what the page shows; the blocks at lines {', '.join(map(str, skipped))} "
            f"need the Tiny Shakespeare text: put it at {SHARED_TEXT} (tests never download it)"
        )


def test_set_up_and_test_commands_are_what_ci_runs():
    setup = [b for b in read_blocks(PAGES[0]) if b.kind == "setup"]
    assert len(setup) == 1 and setup[0].line <= 3, "the README must open with the set-up block"
    install, test = "pip install -r requirements.txt", "python -m pytest"
    assert [line for line in commands(setup[0].text) if line.startswith(SET_UP_ONLY)] == [install, test]
    ci = [line for line in commands((REPO / ".ci" / "run").read_text()) if line.startswith(SET_UP_ONLY)]
    assert len(ci) == 2, f".ci/run must install once and test once: {ci}"
    assert shlex.split(ci[0]) == shlex.split(install) + CI_INSTALL_EXTRA, f".ci/run must run {install!r} plus {CI_INSTALL_EXTRA}"
    assert (REPO / "constraints.txt").is_file()
    assert ci[1].split("||")[0].strip() == test, f".ci/run must run {test!r}, as the README says"


@pytest.mark.parametrize("page", [edition for page in PAGES for edition in (page, chinese(page))], ids=lambda p: str(p.relative_to(REPO)))
def test_every_code_block_is_marked(page):
    assert page.exists(), f"{page.name}: every page has its Chinese edition"
    fences = sum(1 for line in page.read_text().splitlines() if line.startswith("```"))
    assert fences % 2 == 0
    marked = read_blocks(page)
    assert len(marked) == fences // 2, f"{page.name}: every fenced block needs a <!-- test: KIND --> marker"
    assert {b.kind for b in marked} <= {"setup", "cpu", "output", "session", "diff", "excerpt", "gpu", "cluster"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_chinese_edition_shows_the_same_commands(page):
    english, translated = read_blocks(page), read_blocks(chinese(page))
    assert [comparable(b) for b in translated] == [comparable(b) for b in english]


def test_readme_links_the_chinese_edition_and_the_notes():
    readme = PAGES[0].read_text()
    assert "README.zh-CN.md" in readme.split("\n## ")[0], "README.md must link the Chinese edition at the top"
    links = re.findall(r"https://blog\.csdn\.net/\S+?(?=\))", readme)
    assert len(links) == 3 and all(link in chinese(PAGES[0]).read_text() for link in links)


@pytest.mark.parametrize("item", blocks_of_kind("diff"), ids=block_id)
def test_diff_commands_show_a_step_diff(item):
    for command in commands(item[1].text):
        result = subprocess.run(shlex.split(command), cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 1 and result.stdout.startswith("--- "), command


@pytest.mark.parametrize("item", blocks_of_kind("excerpt"), ids=block_id)
def test_diff_excerpts_are_in_the_scripts(item):
    page, block = item
    old, new = ([line.strip() for line in (REPO / name).read_text().splitlines()] for name in block.args)
    for line in block.text.splitlines():
        mark, code = line[:1], line[1:].strip()
        source = {"-": old, "+": new, " ": new}[mark]
        assert code in source, f"{page.name} line {block.line}: {line!r} is not in {block.args[0 if mark == '-' else 1]}"


@functools.cache
def parses(*command: str) -> subprocess.CompletedProcess:
    """A script run on its arguments with CLI_PARSE_ONLY=1: it parses and checks them as it always does, then exits."""
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**learner_env(), "CLI_PARSE_ONLY": "1"}, timeout=120)


def check_torchrun(options: list[str], where: str) -> None:
    """torchrun's options as torchrun itself parses them: an ambiguous or unknown one fails."""
    from torch.distributed.run import get_args_parser

    try:
        get_args_parser().parse_args([*options, "script.py"])
    except SystemExit:
        pytest.fail(f"{where}: torchrun rejects {' '.join(options)}")


def check_invocation(words: list[str], where: str) -> None:
    """A command line of ours: the script exists and takes every argument passed, as its parser reads them."""
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VARIABLE=value before the command
        words = words[1:]
    if words[0] == "pip":  # installs: their syntax is checked, pip's own flags are pip's
        return
    if words[0] == "sbatch":
        script = next(w for w in words[1:] if not w.startswith("-"))
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
        rest = words[words.index(script) + 1 :]
        target = {"slurm/sbatch_run.sh": "multinode.py", "slurm/preflight.sh": "tools/preflight.py"}.get(script, "mingpt/main.py")
        defaults = re.search(r'^\[ "\$#" -gt 0 \] \|\| set -- (.*)$', (REPO / script).read_text(), re.MULTILINE)
        if not rest and defaults:  # the script's own arguments when given none
            rest = defaults.group(1).split()
        check_invocation(["python", target, *rest], where)  # the script passes its arguments on
        return
    if words[0] == "torchrun":
        script_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        check_torchrun(words[1:script_at], where)
        words = ["python", *words[script_at:]]
    if words[0] == "bash":
        assert subprocess.run(["bash", "-n", str(REPO / words[1])]).returncode == 0, f"{where}: {words[1]}"
        return
    assert words[0] == "python", f"{where}: unexpected command {words[0]}"
    script = words[1].replace("$repo/", "")
    assert (REPO / script).is_file(), f"{where}: {script} does not exist"
    result = parses(sys.executable, str(REPO / script), *words[2:])
    assert result.returncode == 0, f"{where}: {script} rejects {' '.join(words[2:])}: {result.stderr.strip()}"
    if script == "mingpt/main.py":  # its settings, as the capstone reads them
        from mingpt.config import DEFAULT_CONFIG, ConfigError, load_config

        try:
            load_config(DEFAULT_CONFIG, [word for word in words[2:] if "=" in word and not word.startswith("-")])
        except ConfigError as err:
            pytest.fail(f"{where}: {err}")


@pytest.mark.parametrize("item", blocks_of_kind("gpu", "cluster"), ids=block_id)
def test_gpu_and_cluster_commands_match_the_scripts(item):
    page, block = item
    where = f"{page.name} line {block.line}"
    assert subprocess.run(["bash", "-n", "-c", block.text]).returncode == 0, f"{where}: bash syntax"
    for command in commands(block.text):
        words = shlex.split(command)
        if words[0] == "export":
            continue
        check_invocation(words, where)
