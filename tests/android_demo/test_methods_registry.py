"""The Java device's methods against the Python registry: the same names, and every other one said."""

from __future__ import annotations

import re

from fwdfed import methods
from tests.conftest import ROOT

METHODS_JAVA = ROOT / "android_demo" / "core" / "src" / "main" / "java" / "org" / "fwdfed" / "core" / "Methods.java"


def test_the_java_methods_are_python_methods_and_the_rest_are_named_with_why():
    source = METHODS_JAVA.read_text()
    java = re.findall(r'"([a-z-]+)"', re.search(r"NAMES = List\.of\(([^)]*)\)", source).group(1))
    python = set(methods.names())
    assert java and set(java) <= python, f"Java runs methods Python does not have: {set(java) - python}"
    comment = source[source.index("/**") : source.index("public final class Methods")]
    assert all(name in comment for name in python), f"Methods.java's comment does not say {python - set(java)}"
    for name in java:  # each has its config branch
        assert f'case "{name}":' in source
