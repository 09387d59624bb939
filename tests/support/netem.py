"""A packet-level netem in userspace: the link between two network namespaces, delaying, dropping and
reordering IP packets, for the tests of faults on a network the tests make for themselves.

This kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is not set: `tc qdisc add ... netem` answers
"Specified qdisc kind is unknown"), Debian packages no emulator that runs without it (no toxiproxy, nothing
named netem), and a TCP-level proxy could not reorder the packets of one connection, so the link is this
process: it opens a TUN device in each of the two namespaces (the
namespaces' only route to each other) and copies every IPv4 packet read from one to the other after
a delay drawn for that packet, or drops it. Each direction is impaired alike, as netem on both hosts'
interfaces would:

- delay: uniform in [delay - jitter, delay + jitter] ms, drawn per packet; a packet drawn a shorter
  delay than the one before it overtakes it, as under netem's jitter without a rate;
- loss: each packet dropped with probability `loss`;
- reorder: each packet sent at once, with no delay, with probability `reorder` (netem's `reorder`),
  so it overtakes the delayed packets in flight;
- partition: every packet to or from the listed addresses dropped, until healed.

TCP sees all of this as it would on a real link: it retransmits what was lost, and puts back in order
what arrived out of it. The draws come from one seeded generator: the n-th packet of a run gets the
same fate every time (which packet is n-th depends on the traffic's timing, which no seed fixes).

    ip netns add a; ip netns add b
    python -m tests.support.netem --near a:tun-a --far b:tun-b --seed 1   # then set the addresses

It says `ready` on stdout once both TUN devices exist (they vanish with the process). Commands, one JSON
object a line on stdin, each answered by one JSON line on stdout:
{"set": {"delay_ms": 200, "jitter_ms": 50, "loss": 0.05, "reorder": 0}}, {"partition": ["192.0.2.10"]},
{"heal": true}, {"stats": true} (the counts since the start, each way: packets forwarded, lost, cut off,
reordered over the link and within one TCP connection, and the delays drawn).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import json
import math
import os
import random
import socket
import struct
import sys
from dataclasses import asdict, dataclass

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
READ_BYTES = 65536


@dataclass
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    reorder: float = 0.0

    def check(self) -> None:
        if not (0 <= self.jitter_ms <= self.delay_ms and 0 <= self.loss <= 1 and 0 <= self.reorder <= 1):
            raise ValueError(f"need 0 <= jitter <= delay and loss, reorder in [0, 1]: {self}")


@dataclass
class Counts:
    """One direction's packets since the start."""
    forwarded: int = 0
    lost: int = 0  # dropped by the loss draw
    partitioned: int = 0  # dropped by the partition
    reordered: int = 0  # sent after a packet that arrived later than it (RFC 4737's reordered packet)
    reordered_in_flow: int = 0  # the same, within one TCP connection: what TCP itself had to put back in order
    not_ipv4: int = 0  # dropped: the link carries IPv4 only
    write_failed: int = 0  # the far device's queue was full (as a full link would drop it)
    arrived: int = 0
    last_sent: int = -1  # arrival number of the latest packet sent
    delayed: int = 0
    delay_ms_sum: float = 0.0
    delay_ms_min: float = math.inf
    delay_ms_max: float = 0.0


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace: a TUN device opened now lives there."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{name}") as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")


def open_tun(netns: str, name: str) -> int:
    enter_netns(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Link:
    def __init__(self, near: int, far: int, seed: int):
        self.fds = {near: far, far: near}
        self.names = {near: "near_to_far", far: "far_to_near"}
        self.counts = {near: Counts(), far: Counts()}
        self.rng = random.Random(seed)
        self.impairment = Impairment()
        self.partitioned: set[bytes] = set()
        self.flows: dict[bytes, int] = {}  # per TCP connection and direction: the packets that arrived
        self.flow_sent: dict[bytes, int] = {}  # and the arrival number of the latest one sent

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for fd in self.fds:
            loop.add_reader(fd, self._read, loop, fd)

    def _read(self, loop, fd: int) -> None:
        while True:
            try:
                packet = os.read(fd, READ_BYTES)
            except BlockingIOError:
                return
            self._route(loop, fd, packet)

    def _route(self, loop, fd: int, packet: bytes) -> None:
        counts, imp = self.counts[fd], self.impairment
        if len(packet) < 20 or packet[0] >> 4 != 4:
            counts.not_ipv4 += 1
            return
        number, counts.arrived = counts.arrived, counts.arrived + 1
        flow, in_flow = self._flow(packet), None
        if flow is not None:
            in_flow = self.flows[flow] = self.flows.get(flow, -1) + 1
        if packet[12:16] in self.partitioned or packet[16:20] in self.partitioned:
            counts.partitioned += 1
            return
        # Both draws for every packet, so one packet's fate does not shift the next one's.
        lost, at_once = self.rng.random() < imp.loss, self.rng.random() < imp.reorder
        delay_ms = imp.delay_ms + self.rng.uniform(-imp.jitter_ms, imp.jitter_ms)
        if lost:
            counts.lost += 1
            return
        if at_once or delay_ms <= 0:
            self._send(fd, packet, number, flow, in_flow)
        else:
            counts.delayed += 1
            counts.delay_ms_sum += delay_ms
            counts.delay_ms_min = min(counts.delay_ms_min, delay_ms)
            counts.delay_ms_max = max(counts.delay_ms_max, delay_ms)
            loop.call_later(delay_ms / 1000, self._send, fd, packet, number, flow, in_flow)

    @staticmethod
    def _flow(packet: bytes) -> bytes | None:
        """A TCP packet's connection, one way (addresses and ports), or None for another protocol."""
        start = (packet[0] & 0x0F) * 4
        if packet[9] != 6 or len(packet) < start + 4:
            return None
        return packet[12:20] + packet[start:start + 4]

    def _send(self, fd: int, packet: bytes, number: int, flow: bytes | None, in_flow: int | None) -> None:
        counts = self.counts[fd]
        try:
            os.write(self.fds[fd], packet)
        except (BlockingIOError, OSError):
            counts.write_failed += 1
            return
        counts.forwarded += 1
        if number < counts.last_sent:
            counts.reordered += 1
        counts.last_sent = max(counts.last_sent, number)
        if flow is not None:
            if in_flow < self.flow_sent.get(flow, -1):
                counts.reordered_in_flow += 1
            self.flow_sent[flow] = max(self.flow_sent.get(flow, -1), in_flow)

    def command(self, line: str) -> dict:
        try:
            request = json.loads(line)
            if "set" in request:
                impairment = Impairment(**request["set"])
                impairment.check()
                self.impairment = impairment
            elif "partition" in request:
                self.partitioned |= {socket.inet_aton(a) for a in request["partition"]}
            elif "heal" in request:
                self.partitioned.clear()
            elif "stats" not in request:
                raise ValueError(f"unknown command {line.strip()!r}")
        except (ValueError, TypeError, OSError) as e:
            return {"error": str(e)}
        return self.stats()

    def stats(self) -> dict:
        out = {}
        for fd, counts in self.counts.items():
            figures = asdict(counts)
            del figures["last_sent"]
            total = figures.pop("delay_ms_sum")
            if counts.delayed:
                figures["delay_ms_mean"] = total / counts.delayed
            else:
                del figures["delay_ms_min"], figures["delay_ms_max"]
            out[self.names[fd]] = figures
        out["impairment"] = asdict(self.impairment)
        out["partitioned"] = sorted(socket.inet_ntoa(a) for a in self.partitioned)
        return out


async def serve(link: Link) -> None:
    loop = asyncio.get_running_loop()
    link.start(loop)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():  # until stdin closes: the test is done with the link
        print(json.dumps(link.command(line.decode())), flush=True)


def endpoint(text: str) -> tuple[str, str]:
    netns, _, device = text.partition(":")
    if not netns or not device or len(device) > 15:
        raise argparse.ArgumentTypeError(f"{text!r} is not NETNS:DEVICE (a device name of at most 15 characters)")
    return netns, device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--near", type=endpoint, required=True, help="NETNS:TUN, one end of the link")
    parser.add_argument("--far", type=endpoint, required=True, help="NETNS:TUN, the other end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        near, far = open_tun(*args.near), open_tun(*args.far)
    except OSError as e:
        print(f"error: cannot open the TUN devices: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(Link(near, far, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
