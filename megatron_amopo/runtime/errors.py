"""One error path for every entry point: a user error is one line on stderr and a distinct exit code.

``@entry_point`` wraps ``main`` of every command (megatron_amopo/cli/, pretrain_amopo.py, tools/). A user error
prints ``error: <what> — <the fix>`` once (rank 0 under torchrun; every rank also writes it to
torchrun's error file, so torchrun's failure box names it as the root cause) and returns its
``ExitCode``. ``AMOPO_DEBUG=1`` adds the traceback. Anything else is a bug and keeps Python's
traceback. Under torchrun the launcher itself exits 1 whatever the workers return.
"""

from __future__ import annotations

import argparse
import enum
import errno
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn, Optional

DEBUG_ENV = "AMOPO_DEBUG"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO = os.path.dirname(_PACKAGE)
_OURS = (_PACKAGE + os.sep, os.path.join(_REPO, "tools") + os.sep, os.path.join(_REPO, "pretrain_amopo.py"))


class ExitCode(enum.IntEnum):
    OK = 0
    BUG = 1  # an unexpected exception: Python's traceback
    USAGE = 2  # bad flags or flag combination, an output that exists (argparse's code too)
    INPUT = 3  # a missing, malformed or mismatched file: data, checkpoint, tokenizer, weights
    EMPTY = 4  # the run would leave nothing usable (no groups, too many rows skipped)
    REFUSED = 5  # the memory or disk pre-flight refused the run
    WRITE = 6  # writing failed: no space left, or another OS error while saving


class UserError(Exception):
    """An error in what the user asked for; ``str`` is ``what — fix``."""

    code = ExitCode.USAGE

    def __init__(self, what: str, fix: str = "", code: Optional[ExitCode] = None) -> None:
        super().__init__(f"{what} — {fix}" if fix else what)
        self.what, self.fix = what, fix
        if code is not None:
            self.code = code


class UsageError(UserError):
    code = ExitCode.USAGE


class InputError(UserError):
    code = ExitCode.INPUT


class EmptyOutput(UserError):
    code = ExitCode.EMPTY


class Refused(UserError):
    code = ExitCode.REFUSED


class WriteFailed(UserError):
    code = ExitCode.WRITE


class CorruptFile(InputError, RuntimeError):
    """A damaged or truncated checkpoint or weight file."""


class MissingTensor(InputError, KeyError):
    """A weight file lacks a tensor the model needs."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of printing the whole usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see {self.prog} --help")


def exit_code(exc: BaseException) -> Optional[ExitCode]:
    """The exit code of a user error, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return exc.code
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ExitCode.WRITE
        return ExitCode.USAGE if isinstance(exc, FileExistsError) else ExitCode.INPUT
    if isinstance(exc, ValueError) and _raised_by_us(exc):
        return ExitCode.USAGE  # our validation convention: an actionable ValueError naming the flag
    return None


def _raised_by_us(exc: BaseException) -> bool:
    """True when the innermost frame is this package's code, not a library's (whose ValueError is a bug)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS)


def message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror.lower()}"
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__  # one line


def report(exc: BaseException, code: ExitCode) -> None:
    """Print the one line (rank 0) and hand it to torchrun's error file (every rank)."""
    line = f"error: {message(exc)}"
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(exc)
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
    _write_error_file(line, code)


def _write_error_file(line: str, code: ExitCode) -> None:
    """torchrun shows this file's message in its failure box instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        with open(path, "w") as fh:
            json.dump(
                {"message": {"message": line, "errorCode": int(code), "extraInfo": {"timestamp": int(time.time())}}}, fh
            )
    except OSError:
        pass


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap an entry point's ``main``: user errors become one line and their exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            report(exc, code)
            return int(code)

    return wrapper
