"""The one error boundary of medcap's command lines (``medcap``, the recipes, ``chat_llama3.py``,
the tools): an error medcap raised on purpose, or one from the operating system (a missing file,
a full disk), prints ``error: <message>`` and exits 1, because its message already names the
file, the record and what was expected; its traceback only with ``MEDCAP_DEBUG=1`` or
``--debug``. Anything unexpected keeps its traceback: that is a bug to report.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

DEBUG_ENV = "MEDCAP_DEBUG"


class MedcapError(Exception):
    """An error whose message tells the user what is wrong and where."""


class ConfigError(MedcapError, ValueError):
    """A config value or combination of values that cannot work."""


class OutputWriteError(MedcapError, OSError):
    """An output file could not be written (disk full, file size limit, permissions)."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [MedcapError, OSError]
    if "torchtune" in sys.modules:  # its config errors name the component and the argument
        from torchtune.config._errors import ConfigError as TuneConfigError
        from torchtune.config._errors import InstantiationError

        errors += [TuneConfigError, InstantiationError]
    return tuple(errors)


def debug_requested(argv: list[str] | None = None) -> bool:
    """``MEDCAP_DEBUG=1`` in the environment, or ``--debug`` among the arguments (removed)."""
    if argv is not None and "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextmanager
def cli_errors(prog: str | None = None) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except _expected_errors() as e:
        _close_progress_bars()
        if debug_requested():
            traceback.print_exc()
        cause = str(e) or type(e).__name__
        print(f"error: {prog + ': ' if prog else ''}{cause}", file=sys.stderr)
        raise SystemExit(1) from None


def _close_progress_bars() -> None:
    """Open tqdm bars redraw themselves when closed at exit: close them first, so the error
    stays the last line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def run_main(main: Callable[..., Any], *args: Any, prog: str | None = None) -> Any:
    """``main(*args)`` inside the boundary (for ``if __name__ == "__main__"`` blocks)."""
    debug_requested(sys.argv)
    with cli_errors(prog):
        return main(*args)
