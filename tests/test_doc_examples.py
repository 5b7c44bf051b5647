"""Every ``deblurcli`` command shown in the README, the docs and the ``--help`` examples parses
(the command and each flag exist, each value converts), and the repository files they name exist.

Parsing uses click's own ``make_context`` (no command runs); checks inside a command's body,
such as value ranges, are covered by each command's tests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deblurcli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("examples/", "scripts/", "benchmarks/", "docs/", "lab/")


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks, backslash continuations joined (inline `...` spans in prose
    are fragments such as `deblurcli deblur --compile`, not examples)."""
    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def _help_lines() -> list[str]:
    command = typer.main.get_command(app)
    lines = []
    for name in [None, *command.commands]:
        result = CliRunner().invoke(app, ([name] if name else []) + ["--help"],
                                    env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
        text = result.stdout.replace("\\\n", " ")
        text = re.sub(r"\s*\\\s*\n\s*", " ", text)  # a continued example
        examples = text.split("Examples:", 1)[1] if "Examples:" in text else ""
        examples = examples.split("╭", 1)[0]  # up to the option panels
        lines += [line.strip() for line in examples.splitlines()
                  if line.strip().startswith("deblurcli ")]
    return lines


def _commands(lines: list[str]) -> list[str]:
    """Every ``deblurcli ...`` command of the lines, also after ``&&`` (the README's set-up)."""
    found = []
    for line in lines:
        line = re.split(r"\s+#", line.strip().lstrip("$ ").strip(), maxsplit=1)[0]
        for part in line.split("&&"):
            part = part.strip().rstrip(" &;").strip()
            if part.startswith("deblurcli "):
                found.append(part)
    return found


def _examples() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for command in _commands(_code_lines(path.read_text(encoding="utf-8"))):
            out.append((path.relative_to(ROOT).as_posix(), command))
    out += [("--help", command) for command in _commands(_help_lines())]
    return out


EXAMPLES = _examples()
# shapes, not commands: "deblurcli deblur IN OUT" in the README table, usage lines with [options]
SKIP = re.compile(r"\[|\.\.\.|…|\bIN OUT\b|deblurcli [a-z-]+$|\$|<|\bNAME\b|\{")


def _parse(command: str) -> None:
    args = shlex.split(command)[1:]
    group = typer.main.get_command(app)
    ctx = group.make_context("deblurcli", list(args), resilient_parsing=False)
    head = list(getattr(ctx, "protected_args", None) or getattr(ctx, "_protected_args", []))
    name, sub, rest = group.resolve_command(ctx, head + list(ctx.args))
    sub.make_context(name, rest, parent=ctx)


def test_examples_were_found():
    sources = {source for source, _ in EXAMPLES}
    assert {"README.md", "docs/deblur.md", "docs/evaluation.md", "--help"} <= sources
    # the README's first set-up command: pip install '.[onnx]' && deblurcli deblur examples/ out/ ...
    assert any(source == "README.md" and command.startswith("deblurcli deblur examples/")
               for source, command in EXAMPLES)
    assert len(EXAMPLES) > 40


@pytest.mark.parametrize("source, command",
                         [e for e in EXAMPLES if not SKIP.search(e[1])],
                         ids=lambda v: v if len(v) < 60 else v[:60])
def test_every_example_parses(source, command):
    try:
        _parse(command)
    except Exception as exc:  # click's UsageError, or Exit for --help/--version
        if type(exc).__name__ == "Exit" and getattr(exc, "exit_code", 1) == 0:
            return
        pytest.fail(f"{source}: {command!r} does not parse: {exc}")


@pytest.mark.parametrize("source, command", EXAMPLES, ids=lambda v: v if len(v) < 60 else v[:60])
def test_files_the_examples_name_exist(source, command):
    for token in shlex.split(command.replace("'", "")):
        if token.startswith(REPO_DIRS):
            assert (ROOT / token).exists(), f"{source}: {command!r} names {token}, not in the repo"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("doc, wrote", [("README.md", "photo_sharp.png"),
                                        ("docs/model.md", "copy")])
def test_the_first_python_example_runs_as_written(doc, wrote, tiny_model_folder, tmp_path,
                                                  monkeypatch):
    """What a library user copies first. model.md's lacked `import torch` and `blurry`
    (NameError); README's gave the UNet's dtype for the input (rounded to half precision before
    a float32 eVAE) and skipped the fill under transparent pixels that deblur does."""
    import shutil

    import numpy as np

    from deblurcli.images import read_image, write_image

    monkeypatch.chdir(tmp_path)
    for name in ("MODEL_DIR", "model"):
        shutil.copytree(tiny_model_folder, tmp_path / name)
    rgba = np.random.default_rng(0).random((40, 56, 4)).astype(np.float32)
    rgba[:8, :, 3] = 0  # a transparent band
    write_image(tmp_path / "photo.png", rgba[..., :3], alpha=rgba[..., 3])
    exec(compile(_python_blocks(ROOT / doc)[0], doc, "exec"), {})
    assert (tmp_path / wrote).exists()
    if wrote.endswith(".png"):
        assert read_image(tmp_path / wrote).alpha is not None
