"""The ``deblurcli`` command: root Typer app, error handling and sub-command registration.

Conventions every sub-command follows:

* CLI modules only parse arguments and print; the work is done by library modules, imported
  *inside* the command function so that ``deblurcli --version`` and ``--help`` never import torch.
* Results go to stdout, progress and warnings to stderr (see :mod:`deblurcli.cli.console`).
* A bad flag value raises ``typer.BadParameter`` (exit 2); a runtime problem the user can fix raises
  :class:`deblurcli.errors.DeblurcliError` (exit 1). Both print one line on stderr (usage errors
  name the flag and the ``--help`` to read). ``DEBLURCLI_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from deblurcli._version import __version__

# Each module listed here defines ``register(app: typer.Typer) -> None``.
COMMAND_MODULES: tuple[str, ...] = (
    "deblurcli.cli.deblur",
    "deblurcli.cli.evaluate",
    "deblurcli.cli.blend",
    "deblurcli.cli.synth",
    "deblurcli.cli.train",
    "deblurcli.cli.export",
)


def _passthrough_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions that Typer/click turn into exit codes themselves (usage errors -> 2, Exit).

    Recent Typer versions vendor click (``typer._click``); older ones use click itself.
    """
    types: list[type[BaseException]] = [typer.Exit, typer.Abort, typer.BadParameter]
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    try:
        import click

        types += [click.ClickException, click.exceptions.Exit, click.exceptions.Abort]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def debug_enabled() -> bool:
    """True when ``DEBLURCLI_DEBUG`` asks for full tracebacks."""
    return os.environ.get("DEBLURCLI_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _usage_error_line(exc: Any) -> str:
    """``error: Invalid value for '--gamma': ... (see deblurcli deblur --help)``: a click usage
    error as one line, instead of Typer's Rich panel with the usage text."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return f"error: {message}{where}"


def _is_usage_error(exc: BaseException) -> bool:
    """A click ``UsageError`` (bad or missing flag, argument, command), whether from click or
    from the copy recent Typer versions vendor (``typer._click``); not ``NoArgsIsHelpError``,
    which is how a command run without arguments shows its help."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names


def _tidy_help(command: Any) -> None:
    """What ``--help`` shows of each flag, here and in every sub-command: no ``<bool>`` after a
    flag (recent Typer prints one, as if it took a value), and a default given as text (the
    training flags show their config's default) as ``[default: 7]``, not click's ``(7)``."""
    for param in getattr(command, "params", ()):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if isinstance(getattr(param, "show_default", None), str) and \
                hasattr(param, "_get_default_string"):
            param._get_default_string = (lambda text: lambda **_: text)(param.show_default)
    get_help_option = getattr(command, "get_help_option", None)
    if get_help_option is not None and not hasattr(get_help_option, "no_type"):
        def help_option(ctx: Any) -> Any:  # made when help is shown: --help, -h
            option = get_help_option(ctx)
            if option is not None and option.metavar is None:
                option.metavar = ""
            return option

        help_option.no_type = True  # type: ignore[attr-defined]
        command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def _help_on_stdout(exc: BaseException) -> None:
    """A command run without its arguments shows its help: on stdout, where ``--help`` puts it
    (``deblurcli eval | less``), not on stderr as recent click does; exit status 2."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        typer.echo(exc.format_message())  # type: ignore[attr-defined]
        raise typer.Exit(2) from None


class DeblurcliGroup(TyperGroup):
    """Turns exceptions from sub-commands into one clear line on stderr and an exit status."""

    def list_commands(self, ctx: Any) -> list[str]:  # keep registration order
        return list(self.commands)

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        _tidy_help(self)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except KeyboardInterrupt as exc:  # while the options are read
            _stopped(exc)
        except Exception as exc:
            _help_on_stdout(exc)
            if _is_usage_error(exc) and not debug_enabled():
                typer.echo(_usage_error_line(exc), err=True)
                raise typer.Exit(2) from None
            raise

    def invoke(self, ctx: Any) -> Any:
        from deblurcli.errors import DeblurcliError

        try:
            return super().invoke(ctx)
        except _passthrough_exceptions() as exc:
            _help_on_stdout(exc)
            if _is_usage_error(exc) and not debug_enabled():
                typer.echo(_usage_error_line(exc), err=True)
                raise typer.Exit(2) from None
            raise
        except DeblurcliError as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            _stopped(exc)
        except BrokenPipeError:  # the reader of stdout has gone (`deblurcli … | head`):
            raise  # click's main leaves quietly with status 1, as its own commands do
        except MemoryError:
            if debug_enabled():
                raise
            typer.echo("error: out of memory; try a smaller --tile or --batch-size", err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - last resort: never dump a traceback on users
            if debug_enabled():
                raise
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                typer.echo("error: the GPU ran out of memory; try a smaller --tile "
                           "(e.g. --tile 512) or --dtype fp16", err=True)
            else:
                typer.echo(f"error: {type(exc).__name__}: {_one_line(exc)} "
                           "(set DEBLURCLI_DEBUG=1 for a traceback)", err=True)
            raise typer.Exit(1) from None


HELP = """Remove motion blur from photographs with a one-step diffusion model (OSDD).

No model ships with deblurcli yet: deblur and eval --weights need a model
folder made by train-diffusion (see docs/training.md).

\b
Examples:
  deblurcli deblur photo.jpg out/ --weights MODEL_DIR       # deblur one photo
  deblurcli deblur photos/ out/ --weights MODEL_DIR --gamma 1.0
  deblurcli synth --src photos/ --out pairs/    # blurred/sharp training pairs
  deblurcli eval --blur pairs/blur --sharp pairs/sharp --pred out/
\b
Set DEBLURCLI_DEBUG=1 to see full tracebacks.
"""


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"deblurcli {__version__}")
        raise typer.Exit(0)


def build_app() -> typer.Typer:
    """Create the Typer app with every sub-command registered."""
    app = typer.Typer(
        cls=DeblurcliGroup,
        name="deblurcli",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode=None,  # click's plain help: reads well at 80 columns and in a pipe
        pretty_exceptions_enable=debug_enabled(),
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: Optional[bool] = typer.Option(
            None, "--version", "-V", callback=_version_callback, is_eager=True,
            help="Print the version and exit.",
        ),
    ) -> None:
        """Remove motion blur from photographs with a one-step diffusion model (OSDD)."""

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    return app


_APP: Optional[typer.Typer] = None


def _built_app() -> typer.Typer:
    global _APP
    if _APP is None:
        _APP = build_app()
    return _APP


def __getattr__(name: str) -> Any:
    """``app``, the root Typer app, built on first use: :func:`main` builds it inside its own
    Ctrl-C/SIGTERM handling, so that stopping a command while it starts prints one word."""
    if name == "app":
        return _built_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Dependencies whose log warnings are no news to the user: bitsandbytes (pulled in by pyiqa,
# imported by peft) asks for the `kernels` package on CPUs with AVX512-BF16, before every
# command's own output; tifffile logs what it finds odd in a file ("contains no pages"), which
# the command then reports in its own words when it matters.
QUIET_LOGGERS: tuple[str, ...] = ("bitsandbytes", "tifffile")


def _quiet_dependency_logs() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


_COMMAND_PROCESS = False


def running_as_command() -> bool:
    """True inside a process that :func:`main` runs (the ``deblurcli`` console script or
    ``python -m deblurcli``): a command may then change process-wide state such as how
    diffusers is imported. False when other code (a test, a notebook) calls the app."""
    return _COMMAND_PROCESS


def _stopped(exc: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C (exit 130) or SIGTERM (:class:`Terminated`, exit 143): one word on stderr."""
    terminated = isinstance(exc, Terminated)
    typer.echo("terminated" if terminated else "interrupted", err=True)
    raise typer.Exit(143 if terminated else 130) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM in a command process, raised like Ctrl-C's ``KeyboardInterrupt`` so that the
    same clean-up runs (no temporary file is left; training saves a checkpoint) and the
    command exits with 143."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    import signal

    global _COMMAND_PROCESS
    _COMMAND_PROCESS = True
    previous = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (main() called by other code): leave it
        pass
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Optional[list[str]]) -> None:
    if debug_enabled():
        os.environ.setdefault("TYPER_STANDARD_TRACEBACK", "1")
    else:
        _quiet_dependency_logs()
    try:
        _built_app()(args=argv, prog_name="deblurcli")
    except KeyboardInterrupt as exc:  # pragma: no cover - interrupt outside a command
        terminated = isinstance(exc, Terminated)
        typer.echo("terminated" if terminated else "interrupted", err=True)
        sys.exit(143 if terminated else 130)
