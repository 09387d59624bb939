"""A network the test makes for itself: two network namespaces, the coordinator's host and the devices'
host, whose only link is the userspace netem (tests.support.netem) between a TUN device in each.

The addresses are TEST-NET-1 (192.0.2.0/24, RFC 5737: for documentation, routed nowhere), and exist only
inside these namespaces: the coordinator listens on 192.0.2.1, device i sends from 192.0.2.(10 + i)
(so that a partition can cut off some devices and not others). Everything is removed on exit, also when
the test fails: the netem process (its TUN devices go with it) and both namespaces.

    with Testbed(devices=21) as bed:
        coordinator = Coordinator(db, "--host", bed.coordinator_ip, ..., launcher=bed.on("coordinator"))
        bed.impair(delay_ms=200, jitter_ms=50, loss=0.05)
        fleet = subprocess.Popen([*bed.on("devices"), sys.executable, "-m", "tests.support.device_fleet", ...])
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import subprocess
import sys

from tests.conftest import ROOT

COORDINATOR_IP = "192.0.2.1"
FIRST_DEVICE = 10
MAX_ADDRESSES = 240  # 192.0.2.10 ... 192.0.2.249; more devices share them, cycling
_names = itertools.count()


def unavailable() -> str | None:
    """Why this machine cannot make the testbed (the reason a test skips with), or None."""
    if os.geteuid() != 0:
        return "network namespaces and TUN devices need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "this kernel has no TUN devices (/dev/net/tun)"
    probe = f"ffprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def device_address(i: int) -> str:
    return f"192.0.2.{FIRST_DEVICE + i % MAX_ADDRESSES}"


def ip(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Testbed:
    def __init__(self, devices: int, seed: int = 0):
        tag = f"ff{os.getpid()}x{next(_names)}"
        self.namespaces = {"coordinator": f"{tag}c", "devices": f"{tag}d"}
        self.addresses = [device_address(i) for i in range(min(devices, MAX_ADDRESSES))]
        self.coordinator_ip = COORDINATOR_IP
        self.seed = seed
        self.netem: subprocess.Popen | None = None

    def on(self, host: str) -> list[str]:
        """The command prefix that runs a command on `host` ("coordinator" or "devices")."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def __enter__(self) -> Testbed:
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        c, d = self.namespaces["coordinator"], self.namespaces["devices"]
        for ns in (c, d):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        self.netem = subprocess.Popen(
            [sys.executable, "-m", "tests.support.netem", "--near", f"{c}:tunc", "--far", f"{d}:tund",
             "--seed", str(self.seed)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        if self._line(10) != "ready":
            raise RuntimeError(f"the netem did not start: {self.netem.stderr.read() if self.netem.poll() else ''}")
        ip("-n", c, "addr", "add", f"{COORDINATOR_IP}/24", "dev", "tunc")
        ip("-n", c, "link", "set", "tunc", "up")
        # One batch for the devices' addresses: one `ip` process, not hundreds.
        ip("-n", d, "-batch", "-", stdin="".join(f"addr add {a}/24 dev tund\n" for a in self.addresses))
        ip("-n", d, "link", "set", "tund", "up")

    def _line(self, timeout: float) -> str:
        """The netem's next line of output, or "" if it gave none within `timeout` seconds."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.netem.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return ""
        return self.netem.stdout.readline().strip()

    def command(self, request: dict) -> dict:
        self.netem.stdin.write(json.dumps(request) + "\n")
        self.netem.stdin.flush()
        answer = json.loads(self._line(10) or '{"error": "no answer from the netem"}')
        if "error" in answer:
            raise RuntimeError(f"netem: {answer['error']}")
        return answer

    def impair(self, delay_ms: float = 0, jitter_ms: float = 0, loss: float = 0, reorder: float = 0) -> dict:
        return self.command({"set": {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss, "reorder": reorder}})

    def partition(self, addresses: list[str]) -> dict:
        return self.command({"partition": addresses})

    def heal(self) -> dict:
        return self.command({"heal": True})

    def stats(self) -> dict:
        return self.command({"stats": True})

    def __exit__(self, *exc) -> None:
        if self.netem is not None:
            if self.netem.poll() is None:
                self.netem.stdin.close()  # it ends when its commands end
                try:
                    self.netem.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.netem.kill()
                    self.netem.wait()
            for pipe in (self.netem.stdout, self.netem.stderr):
                pipe.close()
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
