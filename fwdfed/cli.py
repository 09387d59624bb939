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
from pathlib import Path

from fwdfed.errors import UserError


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


def run_main(main: Callable[[list[str] | None], int], argv=None,
             also: tuple[type[BaseException], ...] = ()) -> None:
    """Run `main`; a UserError or OSError (a file or socket the user named), or one of `also`,
    becomes a one-line error and exit status 2."""
    try:
        code = main(argv)
    except (UserError, OSError, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def write_private(path: Path, text: str) -> None:
    """Write a secret (tokens) readable by its owner only (mode 0600), whole or not at all."""
    scratch = path.with_name(f".{path.name}.tmp")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(scratch, path)
