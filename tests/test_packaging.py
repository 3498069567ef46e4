"""Packaging: console scripts, the tools as aliases of the package's commands, no sys.path hacks.

The non-editable install itself (wheel -> fresh venv -> `ltdet-train` outside the repository) is
.ci/wheel_smoke.sh, run by CI (`make wheel-smoke`)."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from ltdet.cli import USER_ERRORS
from ltdet.spec import SpecError

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted((REPO / "tools").glob("*.py"))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        f"_pkg_tool_{name}", REPO / "tools" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _console_scripts() -> dict:
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    return dict(re.findall(r'"([\w-]+) = ([\w.]+:\w+)"', text))


def test_console_scripts_are_the_package_mains():
    scripts = _console_scripts()
    assert scripts == {
        "ltdet-train": "ltdet.scripts.train:main",
        "ltdet-test": "ltdet.scripts.test:main",
        "ltdet-calibrate": "ltdet.scripts.calibrate:main",
    }
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("name", ["train", "test", "calibrate"])
def test_tools_train_and_test_are_aliases(name):
    tool = _load_tool(name)
    package = importlib.import_module(f"ltdet.scripts.{name}")
    assert tool.main is package.main and tool.parse_args is package.parse_args


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_no_tool_edits_sys_path(path):
    # tools import the installed package (make venv installs it editable)
    assert "sys.path" not in path.read_text(encoding="utf-8")


def test_help_names_the_console_script(capsys):
    from ltdet.scripts import calibrate, test, train

    for module, prog in (
        (train, "ltdet-train"),
        (test, "ltdet-test"),
        (calibrate, "ltdet-calibrate"),
    ):
        with pytest.raises(SystemExit) as e:
            module.parse_args(["--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_spec_errors_are_user_errors():
    assert SpecError in USER_ERRORS
