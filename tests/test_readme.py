"""README.md's shell commands run as written, and the links of README.md and docs/ resolve, so the docs cannot rot.

Every command of README.md's ```bash blocks is either run (`RUN`: cheap, offline) or skipped by an explicit rule
(`SKIP`: installs, the test suite itself, the full training, downloads, the network, long exports), and a test
fails on a command that no rule, or more than one, names: a new command cannot escape silently. The commands run in
README order in one scratch working directory where `examples/`, `benchmarks/` and `docs/` are links to this
checkout's, offline (`HF_HUB_OFFLINE=1`). Commands that read the trained demo model (`outputs/demo-segformer-b0-offset`)
read the README's smoke run's model there, copied to that name once the smoke run has made it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# The quickstart's first command, which .ci/run runs as written.
CI_COMMAND = 'pip install -e ".[dev]" && pytest'

# Commands run, by prefix, and why each is cheap.
RUN = {
    "accelerate launch examples/train.py --output_dir outputs/smoke --max_train_steps 2": "2 steps on 32-pixel scenes",
    "python examples/train.py --help": "a help text",
    "python examples/evaluate_segmentation.py --model_name_or_path outputs/demo-segformer-b0-offset --demo": (
        "100 128-pixel scenes through the smoke run's model"
    ),
    "python examples/push_to_hub.py --output_dir hub/ --model_dir outputs/demo-segformer-b0-offset": (
        "offline: writes hub/<name>/ from a saved folder"
    ),
}
# Commands not run, by prefix, and why.
SKIP = {
    "pip install": "installs packages (network, minutes)",
    "pytest": "the test suite itself",
    "python -m offseg_hf.convert --checkpoint": "needs an official checkpoint downloaded by hand",
    "python examples/push_to_hub.py --output_dir hub/ --weights_dir converted/ --push_to_hub": "uploads to the Hub",
    "python -m offseg_hf.export": "exports for about half a minute (tests/test_onnx.py exports tiny models)",
}
DEMO_MODEL = "outputs/demo-segformer-b0-offset"
SMOKE_MODEL = "outputs/smoke"


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a '#' outside quotes that starts a word)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def shell_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks, continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in fenced_blocks(text, "bash"):
        logical = ""
        for line in block.splitlines():
            line = strip_comment(line)
            if line.endswith("\\"):
                logical += line[:-1].rstrip() + " "
                continue
            logical = " ".join((logical + line).split())
            if logical:
                commands.append(logical)
            logical = ""
    return commands


def rules_matching(command: str) -> list[str]:
    return [prefix for prefix in (*RUN, *SKIP) if command == prefix or command.startswith(prefix + " ")]


def test_every_readme_command_is_run_or_skipped_by_one_explicit_rule():
    commands = shell_commands(README.read_text())
    assert CI_COMMAND in commands, f"the quickstart's first command changed; .ci/run runs {CI_COMMAND!r} as written"
    for command in commands:
        matches = rules_matching(command)
        assert len(matches) == 1, f"README command {command!r} matches {matches or 'no rule'}: add it to RUN or SKIP"
    for prefix in (*RUN, *SKIP):
        assert any(prefix in rules_matching(command) for command in commands), f"rule {prefix!r} matches no command"


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    for folder in ("examples", "benchmarks", "docs"):
        (tmp_path / folder).symlink_to(ROOT / folder, target_is_directory=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    ran = []
    for command in shell_commands(README.read_text()):
        if rules_matching(command)[0] not in RUN:
            continue
        if DEMO_MODEL in command and not (tmp_path / DEMO_MODEL).exists():
            assert (tmp_path / SMOKE_MODEL / "config.json").is_file(), f"{command!r} needs the smoke run's model first"
            shutil.copytree(tmp_path / SMOKE_MODEL, tmp_path / DEMO_MODEL)
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"README command failed ({result.returncode}): {command}\n{output[-3000:]}"
        ran.append(command)
    assert len(ran) >= len(RUN)
    assert (tmp_path / SMOKE_MODEL / "eval_results.json").is_file()
    assert (tmp_path / "hub" / "demo-segformer-b0-offset" / "config.json").is_file()


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (outside code blocks)."""
    anchors, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(text: str) -> list[str]:
    """Link and image targets outside code, without URLs."""
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    targets = re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", prose)
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: broken links: {broken}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.relative_to(ROOT).as_posix())
def test_repository_paths_named_in_the_docs_exist(page):
    # Backticked paths of this repository's files (`offseg_hf/training/recipes.py`, `benchmarks/speed.py`, ...).
    named = re.findall(r"`((?:offseg_hf|examples|benchmarks|tests|docs)/[\w/.-]+\.(?:py|md|png))", page.read_text())
    missing = sorted({path for path in named if not (ROOT / path).exists()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"
