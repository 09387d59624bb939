"""The emulator's devices on a Ray cluster (`python -m device_sdk.emulate ... --ray [ADDRESS]`).

Each worker is a Ray actor that loads the program once and trains the devices it is given one at a
time, exactly as a worker process of the default emulator does (device_sdk.worker.serve_devices):
each device keeps its own shard, credential, budget and state, and talks to the coordinator over
its own websocket. An actor reserves what one training device needs, `--ray-cpus` CPUs and the
largest memory budget among its devices, since its devices take turns; Ray packs and spreads the
actors over the cluster's nodes by those reservations. Ray is the optional extra `ray`.
"""

from __future__ import annotations

import os

from fwdfed.errors import UserError

# A local cluster stays on loopback: without this Ray binds its services to the host's routable address.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]'") from None
    return ray


def split_address(address: str) -> tuple[str, int]:
    """ADDRESS as (host, port); ValueError unless it is host:port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray ADDRESS must be host:port (the head's, as `ray start --head --port` printed), "
                         f"got {address!r}")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """A plain TCP connection to the head first: ray.init would retry an unreachable one for minutes."""
    import socket

    try:
        socket.create_connection(split_address(address), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e}") from None


def start(address: str | None, local_cpus: int):
    """Connect to the cluster at `address`, or start a local one of `local_cpus` CPUs."""
    if address is None:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    ray = import_ray()
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e}") from None
    return ray


def cluster_cpus(ray) -> float:
    return float(ray.cluster_resources().get("CPU", 0))


class Worker:
    """A Ray actor's body: one loaded program, the devices it is given trained one at a time."""

    def run(self, configs: list, profiles: list, timing) -> dict:
        import asyncio
        import logging
        import sys

        import ray

        from device_sdk.worker import serve_devices
        from fwdfed.cli import quiet_libraries
        from fwdfed.memory import peak_rss

        quiet_libraries()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            stream=sys.stderr)
        records = asyncio.run(serve_devices(configs, profiles, timing))
        context = ray.get_runtime_context()
        return {"node": f"{ray.util.get_node_ip_address()} ({context.get_node_id()[:12]})", "pid": os.getpid(),
                "peak_rss": peak_rss(), "devices": records}


def run_workers(ray, groups: list[tuple[list, list]], timing, cpus: float) -> tuple[list[dict], list[str]]:
    """Every group on its own actor; (results of the workers that finished, one line per worker that failed)."""
    remote = ray.remote(Worker)
    actors, calls = [], []
    for configs, profiles in groups:
        memory = max((p.mem_budget_bytes or 0) for p in profiles)
        actor = remote.options(num_cpus=cpus, memory=memory or None, max_restarts=0).remote()
        actors.append(actor)
        calls.append(actor.run.remote(configs, profiles, timing))
    results, failures = [], []
    for (configs, _), call in zip(groups, calls):
        try:
            results.append(ray.get(call))
        except Exception as e:  # noqa: BLE001 - a RayTaskError or a dead actor: its cause is the worker's error
            cause = getattr(e, "cause", None) or e
            names = ",".join(c.device_id for c in configs[:5]) + ("..." if len(configs) > 5 else "")
            failures.append(f"worker of {names}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}")
    for actor in actors:
        ray.kill(actor)
    return results, failures
