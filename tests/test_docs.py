"""The commands the README and docs/ show are commands lade accepts: every ``lade <command> ...`` and
``python pipelines/<script>.py ...`` line of their bash blocks names a real command and parses with that command's
own flags (argparse, the parser the command runs), so a renamed or removed flag cannot linger in the docs."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex

import pytest

from conftest import REPO
from lade_core.cli import COMMANDS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Commands a page shows failing on purpose, or that need what the page installs first: (page, command's words).
SHOWN_FAILING = {("bad-input.md", "evalute"): "the mistyped-command example",
                 ("library.md", "--loss label_smoothing"): "the example plugin's loss, installed on that page first"}


def _commands(text: str) -> list[list[str]]:
    """The argv of each lade command in the page's bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        loops: dict[str, str] = {}  # a shell loop's variable -> its first value
        for line in block.replace("\\\n", " ").splitlines():
            loop = re.match(r"\s*for (\w+) in (\S+)", line)
            if loop:
                loops[loop[1]] = loop[2]
                line = line.split(";", 1)[1] if ";" in line else ""
            line = line.strip().removeprefix("do ")
            for var, value in loops.items():
                line = line.replace(f"${var}", value)
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
                words = words[1:]
            if "--" in words and words[:3] == ["ray", "job", "submit"]:
                words = words[words.index("--") + 1:]
            if words[:1] == ["lade"] and len(words) > 1 and not words[1].startswith("-"):
                out.append([words[1], *words[2:]])
            elif len(words) > 1 and words[0] == "python" and re.fullmatch(r"pipelines/\w+\.py", words[1]):
                out.append([words[1][len("pipelines/"):-3].replace("_", "-"), *words[2:]])
    return out


def _cut_at_pipe(argv: list[str]) -> list[str]:
    for i, w in enumerate(argv):
        if w in ("|", "&&", ";", ">", "2>&1", "&"):
            return argv[:i]
    return argv


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_on_the_page_parses_with_that_commands_flags(page):
    commands = _commands(page.read_text())
    bad = []
    for name, *argv in commands:
        if any(page.name == p and words in shlex.join([name, *argv]) for p, words in SHOWN_FAILING):
            continue
        if name not in COMMANDS:
            bad.append(f"{name}: no such command")
            continue
        module = importlib.import_module(f"lade_core.cli.{COMMANDS[name][0]}")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                module.parse_args(_cut_at_pipe(argv))
        except SystemExit as e:
            if e.code:
                bad.append(f"lade {name} {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}")
    assert not bad, "\n".join(bad)


def test_the_docs_show_each_command():
    shown = {name for page in PAGES for name, *_ in _commands(page.read_text())}
    assert shown >= set(COMMANDS), sorted(set(COMMANDS) - shown)
