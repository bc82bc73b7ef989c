"""The README's quick start and .ci/run stay in sync."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands():
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
  return [line.strip() for block in blocks for line in block.splitlines()
          if line.strip() and not line.strip().startswith("#")]


def test_quick_start_is_exactly_two_commands():
  commands = _quick_start_commands()
  assert len(commands) == 2, commands
  assert "dprl.demo" in commands[0]
  assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
  test_command = _quick_start_commands()[1]
  ci_lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
  assert test_command in ci_lines
