"""The ExecuTorch runtime, loaded once, with its log written as raw bytes: what every engine runs on."""

from __future__ import annotations

import ctypes
import functools
import os

from fwdfed.errors import UserError


class EngineError(UserError):
    """The program cannot be loaded or run; the message is meant for the user."""


class _PalImpl(ctypes.Structure):
    """ExecuTorch's table of platform functions (`executorch::runtime::PalImpl`, runtime/platform/platform.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("init", "abort", "current_ticks", "ticks_to_ns_multiplier",
                                                     "emit_log_message", "allocate", "free", "source_filename")]


# et_pal_emit_log_message(timestamp, level, filename, function, line, message, length)
_LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t)
_QUIET_LEVELS = {ord("D"), ord("I")}  # debug and info: the CPU probe's chatter; errors still reach stderr


@functools.cache
def runtime():
    """The ExecuTorch runtime, with its errors written to stderr as raw bytes and its info chatter off
    (`raw_log`)."""
    raw_log()
    from executorch.runtime import Runtime

    return Runtime.get()


@functools.cache
def raw_log():
    """The bindings' extension (`_C`), its log written as raw bytes and its info chatter off. Without
    `executorch.runtime`, whose import (through `executorch.exir`) costs a fresh process seconds more:
    the Java device's helper process on the JVM (tests/android_demo/loss_helper.py) calls `_C` itself.

    The Python bindings pass the runtime's log through `sys.stderr`, decoding it as UTF-8; a log
    line quoting bytes of a corrupt program (a file identifier, say) does not decode, and the
    failed decode aborts the process where loading should have raised. The runtime's own C logger
    writes the bytes as they are; it gets every message but debug and info ones (the CPU probe
    prints five at start-up) unless FWDFED_RUNTIME_LOG=all. The active table is updated in place
    before the runtime starts: `register_pal` would log an error of its own, being called after
    the bindings' registration.
    """
    import torch  # noqa: F401 - libtorch, which the extension links, loaded first (as the wheel requires)
    from executorch.extension.pybindings import _C

    try:
        lib = ctypes.CDLL(_C.__file__)  # its symbol lookup reaches libexecutorch.so, which it links
        get_pal_impl = lib._ZN10executorch7runtime12get_pal_implEv  # executorch::runtime::get_pal_impl()
        c_logger = _LOG_FN(ctypes.cast(lib.et_pal_emit_log_message, ctypes.c_void_p).value)
    except (OSError, AttributeError):
        # Another ExecuTorch build without these symbols: keep its logger (pinned 1.5.1 has them).
        return _C
    get_pal_impl.restype = ctypes.POINTER(_PalImpl)
    if os.environ.get("FWDFED_RUNTIME_LOG") == "all":
        logger = c_logger
    else:
        def logger(timestamp, level, filename, function, line, message, length):
            if level not in _QUIET_LEVELS:
                c_logger(timestamp, level, filename, function, line, message, length)

        logger = _LOG_FN(logger)
    _keep.append(logger)  # the runtime calls it for the life of the process
    get_pal_impl().contents.emit_log_message = ctypes.cast(logger, ctypes.c_void_p).value
    return _C


_keep: list = []
