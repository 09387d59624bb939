"""One worker of the emulator: its devices sharing one loaded program, taking turns to train.

The process emulator (device_sdk.emulate) runs each worker in a process of its own
(`run_devices`); the Ray fleet (device_sdk.ray_fleet) in an actor (`serve_devices`).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sys

from fwdfed.cli import quiet_libraries, run_main


async def serve_devices(configs: list, profiles: list, timing) -> list[dict]:
    """These logical devices, start to finish, sharing one loaded program, the bundle, data and tokenizer read once
    (device_sdk.setup.Shared), and taking turns to train (each keeps its own shard, token, seeds and connection);
    each device's record (device_sdk.profiles). `timing`: the fleet's (device_sdk.fleet_time.Timing)."""
    from device_sdk.fleet_time import WorkerFleet
    from device_sdk.profiles import ProfiledDevice
    from device_sdk.setup import Shared

    fleet, shared = WorkerFleet(timing), {}
    # Every device labels its shard with its teacher (if given) before the shared student program is
    # loaded, so that no teacher is resident beside the student.
    devices = []
    for config, profile in zip(configs, profiles):
        if (key := Shared.key(config)) not in shared:
            shared[key] = Shared.read(config)
        devices.append(ProfiledDevice(config, profile, fleet, shared=shared[key], load_program=False))
    program = devices[0].program  # one check and one load for all; a crash leaves every device declining
    engine = program.load()
    for d in devices:
        d.program, d.engine = program, engine
    done = await asyncio.gather(*(d.run() for d in devices))
    return [d.record(tasks) for d, tasks in zip(devices, done)]


def run_devices(configs: list, profiles: list, timing, results) -> None:
    """Process entry: serve_devices, its records sent on `results` (the sending end of a pipe). Exit status 2 with
    one line on a user error."""
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    from fwdfed.memory import peak_rss

    def main(_argv):
        records = asyncio.run(serve_devices(configs, profiles, timing))
        results.send({"node": "local", "pid": multiprocessing.current_process().pid, "peak_rss": peak_rss(),
                      "devices": records})
        return 0

    run_main(main)
