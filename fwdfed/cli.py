"""What every command-line entry point shares: quiet libraries and one-line errors.

A user error (bad path, bad flag value, unreachable server) is printed as one line starting
with `error:` and the command exits with status 2. A traceback means a bug.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable


class UserError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, for a one-line error built on a library's."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def quiet_libraries() -> None:
    """Silence the import-time and deprecation chatter of torch, torchao and transformers."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_LOGS", "-all")
    for name in ("torchao", "torch", "transformers", "peft", "executorch", "websockets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def run_main(main: Callable[[list[str] | None], int], user_errors: tuple[type[BaseException], ...], argv=None) -> None:
    """Run `main`; turn the listed exception types into a one-line error and exit status 2."""
    try:
        code = main(argv)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
