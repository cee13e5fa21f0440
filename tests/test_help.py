"""Every command's --help at 80 columns reads like git's: plain metavars, wrapped paragraphs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from tribunal.cli.app import app, plain_metavars


def command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    plain_metavars(root)
    paths: list[list[str]] = [[]]
    for name, sub in getattr(root, "commands", {}).items():
        paths.append([name])
        paths.extend([name, child] for child in getattr(sub, "commands", {}))
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "tribunal")
def test_help_has_plain_metavars_and_whole_sentences(path: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    result = subprocess.run(
        [sys.executable, "-m", "tribunal", *path, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for typer_name in ("<bool>", "<str>", "<int>", "<float", "<path>", "<list", "{"):
        assert typer_name not in out.split("\n\n")[0], (typer_name, out)  # usage line
    assert "<bool>" not in out and "<str>" not in out and "range>" not in out, out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    # a paragraph is rewrapped to the width: no line of prose stops short mid-sentence
    # (typer's rich mode kept the docstring's own line breaks: "llama.cpp's" alone on a line)
    description = out.split("\n\n")[1:2]
    for paragraph in description:
        lines = paragraph.splitlines()
        assert all(len(line) > 50 for line in lines[:-1]), paragraph
