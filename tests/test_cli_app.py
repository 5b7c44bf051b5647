"""The root command: version, help, error handling conventions."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from deblurcli import __version__
from deblurcli.cli.app import DeblurcliGroup, app
from deblurcli.errors import DeblurcliError

runner = CliRunner()


def test_version_flag_prints_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"deblurcli {__version__}"


def test_version_and_help_do_not_import_torch():
    # Building the app registers every sub-command; none may import torch at module level.
    code = (
        "import sys\n"
        "from deblurcli.cli.app import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
        "assert 'diffusers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "deblurcli", "--version"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert __version__ in proc.stdout


def test_a_user_error_is_one_line_on_stderr_even_after_heavy_imports(tmp_path):
    """`deblur` imports torch, diffusers and peft before it finds the model folder missing; the
    user still sees one line (dependencies' import-time log warnings, such as bitsandbytes asking
    for `kernels` on AVX512-BF16 CPUs, are not theirs to read)."""
    import numpy as np

    from deblurcli.images import write_image

    write_image(tmp_path / "in.png", np.full((8, 8, 3), 0.5, dtype=np.float32))
    proc = subprocess.run([sys.executable, "-m", "deblurcli", "deblur", str(tmp_path / "in.png"),
                           str(tmp_path / "out"), "--weights", str(tmp_path / "no-model")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: model folder not found: {tmp_path / 'no-model'}"]
    assert not (tmp_path / "out").exists()


def test_sigterm_cleans_up_like_ctrl_c_and_exits_143(tmp_path):
    """`kill PID` in the middle of an atomic write: the temporary file is removed (as on Ctrl-C)
    and the command says so and exits 143; by default Python would die leaving it behind."""
    code = (
        "import os, signal, sys, time\n"
        "from deblurcli.cli import app as cli\n"
        "from deblurcli.images import atomic_write\n"
        "@cli.app.command('slow-write')\n"
        "def slow_write(path: str) -> None:\n"
        "    def write(tmp):\n"
        "        tmp.write_bytes(b'half')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    atomic_write(path, write)\n"
        "cli.main(['slow-write', sys.argv[1]])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.png")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143 and proc.stderr.strip() == "terminated", proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_command_is_usage_error():
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == 2


@pytest.mark.parametrize("args, words", [
    (["deblur", "a.png", "out", "--gamma", "2"], ["--gamma", "[0, 1]", "deblurcli deblur --help"]),
    (["deblur", "a.png", "out", "--tile", "abc"], ["--tile", "integer"]),
    (["deblur", "a.png", "out", "-g", "0"], ["No such option: -g"]),  # Real-ESRGAN's GPU id
    (["blend", "-w", "m", "-o", "b.safetensors", "-g", "0.5"], ["No such option: -g"]),
    (["deblur", "a.png"], ["Missing argument 'OUTPUT'"]),
    (["eval", "--blur", "b", "--metrics", "psnr,foo"], ["--metrics", "foo"]),
    (["synth", "--src", "p", "--out", "o", "--workers", "x"], ["--workers"]),
    (["no-such-command"], ["No such command", "deblurcli --help"]),
    (["--no-such-flag"], ["No such option"]),
])
def test_a_bad_flag_value_is_one_line_on_stderr_exit_2(args, words):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""


def test_help_promises_no_built_in_model():
    for args in (["--help"], ["deblur", "--help"]):
        text = " ".join(runner.invoke(app, args).stdout.split())
        assert "built-in" not in text and "installed with deblurcli" not in text
        assert "--weights MODEL_DIR" in text and "No model ships with deblurcli yet" in text
    deblur_help = runner.invoke(app, ["deblur", "--help"]).stdout
    assert "-g " not in deblur_help and "--gamma" in deblur_help


COMMANDS = ("deblur", "eval", "blend", "synth", "train-vae", "train-diffusion", "export")


def test_help_shows_flags_without_a_value_type():
    """A flag takes no value: recent Typer prints ``<bool>`` beside each, as if it did."""
    for args in (["--help"], *([name, "--help"] for name in COMMANDS)):
        result = runner.invoke(app, args, terminal_width=200)
        assert result.exit_code == 0, args
        assert "<bool>" not in result.stdout, args
        assert "--help" in result.stdout and "-h" in result.stdout
    assert "<int>" in runner.invoke(app, ["deblur", "--help"], terminal_width=200).stdout


def test_help_keeps_every_bracketed_word():
    """Help is click's plain text: "[video]" shows as written, with no Rich escape."""
    for name, words in (("deblur", ["'deblurcli[video]'"]), ("synth", ["'deblurcli[video]'"]),
                        ("eval", ["'deblurcli[eval]'"])):
        text = "".join(runner.invoke(app, [name, "--help"], terminal_width=200).stdout.split())
        assert all(word in text for word in words) and "\\[" not in text, name


def test_help_reads_well_at_80_columns():
    """A terminal's usual 80 columns: no line longer, every flag's names on one line with their
    help beside them (Rich's option table squeezed the help into a 20-column strip), each
    command's summary whole in the command list, and defaults as ``[default: 7]``."""
    import re

    for args in (["--help"], *([name, "--help"] for name in COMMANDS)):
        result = runner.invoke(app, args, terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0, args
        lines = result.stdout.splitlines()
        assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
        assert "[default: (" not in result.stdout, args
        assert "│" not in result.stdout
        if "Commands:" in result.stdout:
            assert "..." not in result.stdout.split("Commands:")[1]
    text = runner.invoke(app, ["deblur", "--help"], terminal_width=80,
                         env={"COLUMNS": "80"}).stdout
    assert re.search(r"^  --vae-fp32 / --no-vae-fp32 +Run the VAE in fp32", text, re.M), text
    assert re.search(r"^  --gamma <float> +Dual-adapter blend", text, re.M), text
    assert "[default: 0.7]" in " ".join(text.split())
    text = runner.invoke(app, ["train-diffusion", "--help"], terminal_width=80,
                         env={"COLUMNS": "80"}).stdout
    assert "[default: 7; x>=1]" in " ".join(text.split())


def _error_app() -> typer.Typer:
    sub = typer.Typer(cls=DeblurcliGroup)

    @sub.command()
    def user_error() -> None:
        raise DeblurcliError("the file 'x.png' does not exist")

    @sub.command()
    def crash() -> None:
        raise RuntimeError("boom\nsecond line")

    @sub.command()
    def reader_gone() -> None:  # `deblurcli … | head`: stdout's reader has left
        raise BrokenPipeError(32, "Broken pipe")

    @sub.command()
    def bad_value(gamma: float = typer.Option(0.7)) -> None:
        raise typer.BadParameter("must be in [0, 1]", param_hint="--gamma")

    return sub


def test_user_error_is_one_line_exit_1(monkeypatch):
    monkeypatch.delenv("DEBLURCLI_DEBUG", raising=False)
    result = runner.invoke(_error_app(), ["user-error"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: the file 'x.png' does not exist"]


def test_unexpected_error_is_one_line_and_mentions_debug(monkeypatch):
    monkeypatch.delenv("DEBLURCLI_DEBUG", raising=False)
    result = runner.invoke(_error_app(), ["crash"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "RuntimeError: boom second line" in lines[0]
    assert "DEBLURCLI_DEBUG=1" in lines[0]


def test_a_reader_that_leaves_early_is_no_error(monkeypatch):
    monkeypatch.delenv("DEBLURCLI_DEBUG", raising=False)
    result = runner.invoke(_error_app(), ["reader-gone"])
    assert result.exit_code == 1 and result.stderr == ""


def test_debug_env_reraises(monkeypatch):
    monkeypatch.setenv("DEBLURCLI_DEBUG", "1")
    result = runner.invoke(_error_app(), ["crash"])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_bad_parameter_is_exit_2():
    result = runner.invoke(_error_app(), ["bad-value"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: Invalid value for --gamma: must be in [0, 1] "
                                     "(see root bad-value --help)")


def test_main_called_from_a_thread_runs_and_leaves_no_handler_behind():
    import signal
    import threading

    from deblurcli.cli.app import main

    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            main(["--version"])
        except SystemExit as exc:
            if exc.code not in (0, None):
                errors.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    assert errors == []
    try:
        main(["--version"])
    except SystemExit:
        pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_while_the_options_are_read_exits_like_one_during_the_run():
    from deblurcli.cli.app import Terminated

    sub = typer.Typer(cls=DeblurcliGroup)

    def stop(value):
        if value:
            raise Terminated
        return value

    @sub.command()
    def slow(flag: bool = typer.Option(False, "--flag", callback=stop)) -> None:
        pass

    @sub.command()
    def other() -> None:
        pass

    result = runner.invoke(sub, ["slow", "--flag"])
    assert result.exit_code == 143 and result.stderr.strip() == "terminated"


def test_a_signal_while_the_commands_are_imported_is_one_word(monkeypatch, capsys):
    """The app is built inside main's own handling, not when the module is imported: Ctrl-C in
    the first third of a second (the command modules importing numpy and the rest) printed a
    traceback."""
    from deblurcli.cli import app as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_APP", None)
    monkeypatch.setattr(cli, "build_app", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_command_without_its_arguments_shows_its_help_on_stdout():
    """Recent click prints it on stderr: ``deblurcli eval | less`` showed nothing."""
    for args in ([], ["eval"], ["blend"], ["synth"], ["export"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, args
        assert result.stdout.startswith("Usage: deblurcli") and result.stderr == "", args
        assert "Options:" in result.stdout
