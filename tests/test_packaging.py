"""pyproject.toml: the packages an install ships and the console command's target."""
import importlib
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_install_ships_minivllm_and_kernels_only():
    include = PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {p.split(".")[0] for p in find_packages(str(ROOT), include=include)}
    assert top_level == {"minivllm", "kernels"}


def test_console_command_runs_the_cli():
    module, _, name = PROJECT["project"]["scripts"]["minivllm"].partition(":")
    from minivllm.__main__ import main
    assert getattr(importlib.import_module(module), name) is main
