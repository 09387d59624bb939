"""Fixtures of the Java core's tests: the core compiled once per session."""

from __future__ import annotations

import pytest

from tests.android_demo.support import JavaCore, compile_core


@pytest.fixture(scope="session")
def java_core(tmp_path_factory) -> JavaCore:
    return compile_core(tmp_path_factory.mktemp("java-classes"))
