"""The typer application and the consoles every command prints to."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mtml.errors import MtmlError

__all__ = ["INTERRUPTED", "app", "console", "err_console", "main", "prints"]

INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT)
TERMINATED = 143  # exit status after SIGTERM (128 + SIGTERM)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mtml: multi-task learning, meta-learning and knowledge transfer on PyTorch.")
console = Console()
err_console = Console(stderr=True)


def prints() -> bool:
    """Whether this process shows results: a plain process, or rank 0 under torchrun / ``--nproc`` (the
    process group is already closed when a command prints, so this reads the environment)."""
    return os.environ.get("RANK", "0") == "0"


_signals: list[int] = []  # the signals this process received (click turns the exception into an exit code)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM: inside a training loop, stop after the step in progress with a checkpoint of it (see
    mtml.engine._preempt); anywhere else, stop at once the way Ctrl-C does."""
    from mtml.engine import Terminated, request_stop

    _signals.append(signum)
    if not request_stop():
        raise Terminated


def _on_late_sigterm(signum: int, frame: object) -> None:
    """SIGTERM after the command has finished (while the interpreter shuts down): exit at once, quietly."""
    os._exit(TERMINATED)


_PACKAGE = str(Path(__file__).resolve().parents[1])  # src/mtml: warnings raised in mtml's own code
_show_other_warning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """mtml's own warnings as one line, ``warning: ...`` (rank 0 only under torchrun / ``--nproc``, like its
    results), without Python's file name and source line; other libraries' warnings as Python shows them."""
    if not str(Path(filename).resolve()).startswith(_PACKAGE):
        _show_other_warning(message, category, filename, lineno, file, line)  # type: ignore[arg-type]
        return
    if prints():
        text = str(message).removeprefix("mtml: ")
        err_console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app on ``argv`` (default: the command line's arguments), turning mtml's errors
    into one-line messages without a traceback and its warnings into one-line ``warning:`` messages. SIGTERM is
    handled like Ctrl-C (exit status 143)."""
    from mtml._allocator import keep_freed_memory

    warnings.showwarning = _show_warning
    keep_freed_memory()  # freed activations stay in the heap for the next step (MTML_MALLOC=default: glibc's)
    handles = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None)
    if handles:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _main(argv)
    finally:
        if handles:  # a SIGTERM during exit handlers must not print a traceback from one of them
            signal.signal(signal.SIGTERM, _on_late_sigterm)


def _main(argv: list[str] | None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except MtmlError as exc:
        if getattr(exc, "echo_of_rank", None) is not None:
            sys.exit(2)  # rank 0 printed this error already
        # soft_wrap: one line however long (the terminal folds it), so logs and grep see one line
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (OSError, UnicodeError, MemoryError) as exc:
        if os.environ.get("MTML_TRACEBACK"):
            raise
        if os.environ.get("MTML_LAUNCHED") and os.environ.get("RANK", "0") != "0":
            sys.exit(2)  # the launcher names failed ranks; rank 0 prints the cause
        err_console.print(f"[bold red]error:[/] {escape(os_message(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        # Usage errors (bad option, missing argument) come from typer's bundled click: show them its way.
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise
    # typer answers Ctrl-C (and typer.Exit) in non-standalone mode with a returned exit code, not an exception
    if isinstance(code, int) and code:
        if code == INTERRUPTED:
            _interrupted()
        sys.exit(code)


_ERRNO_HINTS = {  # what to do, after the system's own words for the error
    errno.ENOSPC: "free space (or choose another --out) and run the same command again; checkpoints already "
                  "written are kept",
    errno.EDQUOT: "free space and run the same command again",
    errno.EROFS: "choose a writable place (--out, MTML_CACHE)",
    errno.EACCES: "choose a place you can write to (--out, MTML_CACHE) or fix its permissions",
    errno.EPERM: "choose another place (--out, MTML_CACHE)",
    errno.EISDIR: "give a file's path, not a directory's",
    errno.ENOTDIR: "a part of this path is a file, not a directory",
    errno.EMFILE: "raise the limit (ulimit -n) or use fewer --nproc ranks",
    errno.ENOMEM: "use a smaller batch_size, meta_batch, ways/shots or fewer --nproc ranks",
}


def os_message(exc: BaseException) -> str:
    """One line for an error of the operating system (or of decoding, or memory), naming the file and the fix.

    ``MTML_TRACEBACK=1`` shows the traceback instead (for bug reports).
    """
    if isinstance(exc, MemoryError):
        return ("out of memory: use a smaller batch_size, meta_batch, ways/shots or fewer --nproc ranks "
                "(MTML_TRACEBACK=1 shows where).")
    if isinstance(exc, UnicodeError):
        return (f"a file is not UTF-8 text ({exc}): save it as UTF-8 (MTML_TRACEBACK=1 shows which file was "
                "being read).")
    assert isinstance(exc, OSError)
    where = " → ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    hint = _ERRNO_HINTS.get(exc.errno or -1)
    parts = [f"{what}{f': {where}' if where else ''}"]
    if hint:
        parts.append(hint)
    return "; ".join(parts) + " (MTML_TRACEBACK=1 shows the traceback)."


def _interrupted() -> None:
    """Ctrl-C (or SIGTERM): one line (from the launcher of an ``--nproc`` run or rank 0 under torchrun), exit
    status 130 (143 for SIGTERM, also when another rank received it and this one stopped at the same step)."""
    engine = sys.modules.get("mtml.engine")
    terminated = engine.last_terminated() if engine is not None else None
    message = terminated.message if terminated is not None else ""
    code = TERMINATED if terminated is not None or signal.SIGTERM in _signals else INTERRUPTED
    if "MTML_LAUNCHED" not in os.environ and prints():
        what = "terminated" if code == TERMINATED else "interrupted"
        err_console.print(message or f"{what}. Continue a run by running the same command again, or with: "
                                     "mtml train --resume RUN")
    sys.exit(code)
