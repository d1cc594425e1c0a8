"""The README and docs/ pages: every command they show parses, and every page they link to exists."""

import pathlib
import re
import shlex

import pytest

from asyncsgd.cli import build_parser
from asyncsgd.sweep import experiment_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]


def _commands(page: pathlib.Path):
    """`(line number, argv)` of every command line inside the page's ```bash blocks."""
    inside = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```console")
            continue
        if inside and line.strip() and not line.lstrip().startswith("#"):
            argv = shlex.split(line.split(" # ")[0].split("  #")[0], comments=False)
            yield number, argv


def _experiment_flags(script: pathlib.Path) -> set[str]:
    """The flags an experiment script accepts: the shared ones and those its source adds."""
    shared = {flag for action in experiment_parser("doc", "x")._actions for flag in action.option_strings}
    return shared | set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))


def _check(argv: list[str], where: str) -> None:
    if any("<" in token for token in argv[:2]):  # a template (`python experiments/<script>.py`), not a command
        return
    if argv[:3] == ["python", "-m", "asyncsgd"]:
        argv = ["asyncsgd", *argv[3:]]
    if argv[0] == "asyncsgd":
        if "--help" in argv:
            assert argv[1] in build_parser().subcommands, where
            return
        build_parser().parse_args(argv[1:])  # a bad flag or value raises ConfigError
    elif argv[0] == "make":
        targets = re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(target in targets for target in argv[1:]), where
    elif argv[0] == "python" and argv[1].startswith("experiments/"):
        script = ROOT / argv[1]
        assert script.exists(), where
        flags = [token.split("=")[0] for token in argv[2:] if token.startswith("--")]
        unknown = set(flags) - _experiment_flags(script)
        assert not unknown, f"{where}: {sorted(unknown)}"
    elif argv[0] in ("ray", "pip", "git", "cd", "kill", "XLA_FLAGS=--xla_force_host_platform_device_count=4"):
        return
    else:
        pytest.fail(f"{where}: a command this test does not know how to check: {' '.join(argv)}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_parses(page):
    commands = list(_commands(page))
    for number, argv in commands:
        _check(argv, f"{page.relative_to(ROOT)}:{number}")
    if page.name == "usage.md":
        assert len(commands) >= 10  # the page's commands were found at all


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_linked_page_exists(page):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_a_wrong_flag_in_a_page_would_be_caught():
    with pytest.raises(Exception, match="unrecognized arguments: --no-such-flag"):
        _check(["asyncsgd", "train", "--no-such-flag"], "here")
    with pytest.raises(AssertionError, match="--no-such-flag"):
        _check(["python", "experiments/ablation.py", "--no-such-flag"], "here")
