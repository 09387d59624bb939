"""python -m coordinator: run federated rounds over websockets, state in SQLite.

    python -m coordinator serve --db runs/job.db --port 8765 --bundle bundles/stories \\
        --eval-data ../shared/data/tinystories/train_head.txt --rounds 5 --devices-per-round 3

Restarting `serve` on the same --db resumes the unfinished job where it stopped
(coordinator.serve_cli). The other commands enrol and revoke devices, report on a job and
export its adapter; the dashboard's and the bundle keys' are theirs (coordinator.dashboard.cli,
coordinator.bundle_keys).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coordinator import bundle_keys, serve_args, serve_cli
from coordinator.dashboard import cli as dashboard_cli
from coordinator.job import JobOptions
from coordinator.serve_cli import full_bundle, tls_context
from fwdfed.cli import quiet_libraries, run_main
from fwdfed.errors import UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cli.add_command(commands)
    en = commands.add_parser("enrol", help="issue a credential (an Ed25519 key pair) for each device; written to --out")
    en.add_argument("--db", required=True)
    en.add_argument("--device-id", nargs="+", required=True,
                    help="device ids to enrol (re-enrolling replaces the credential)")
    en.add_argument("--out", type=Path, required=True,
                    help="JSON file of device id -> {\"private_key\": PEM} (or, with --bearer, -> token), for the devices")
    en.add_argument("--bearer", action="store_true",
                    help="issue replayable bearer tokens instead, as before challenge-response (only serve "
                         "--allow-bearer accepts them)")
    rv = commands.add_parser("revoke", help="revoke devices' credentials; connected ones are cut off within a second")
    rv.add_argument("--db", required=True)
    rv.add_argument("--device-id", nargs="+", required=True)
    cr = commands.add_parser("credentials", help="list enrolled devices and whether their credential is revoked")
    cr.add_argument("--db", required=True)
    e = commands.add_parser("export-adapter", help="write a stored global adapter as a peft adapter folder")
    e.add_argument("--db", required=True, help="SQLite file path or SQLAlchemy database URL")
    e.add_argument("--job-id", help="default: the most recent job")
    e.add_argument("--version", help="global adapter version: a number, 'best' (by held-out metric) or "
                   "'latest' (the default)")
    e.add_argument("--out", type=Path, required=True, help="folder to write (adapter_config.json + weights)")
    e.add_argument("--on", choices=("full", "emulator"),
                   help="offsite tuning: the adapter for the full model (the default for a job served with "
                        "--eval-bundle) or for the emulator the devices trained on")
    st = commands.add_parser("status", help="jobs, rounds, devices, last metrics, refusals")
    st.add_argument("--db", required=True)
    st.add_argument("--job-id", help="default: the most recent job")
    pl = commands.add_parser("plot", help="held-out loss/accuracy per round as a PNG")
    pl.add_argument("--db", required=True)
    pl.add_argument("--job-id", help="default: the most recent job")
    pl.add_argument("--out", type=Path, required=True)
    dashboard_cli.add_commands(commands)
    bundle_keys.add_commands(commands)
    args = parser.parse_args(argv)
    dashboard_cli.check(parser, args)
    serve_args.check(parser, args)
    return args


def enrol(args) -> int:
    """Private keys (or tokens) go to the --out file only (mode 0600), written whole or not at all; the database
    keeps public keys (or tokens' hashes)."""
    import json

    from coordinator.store import open_store
    from fwdfed.cli import write_private
    from fwdfed.protocol import MAX_ID

    bad = [d for d in args.device_id if not d or len(d) > MAX_ID]
    if bad:
        raise UserError(f"device ids must be 1 to {MAX_ID} characters: {bad[0]!r}")
    store = open_store(args.db)
    if args.bearer:
        issued = {device_id: store.enrol(device_id) for device_id in args.device_id}
        kind = "bearer tokens (only serve --allow-bearer accepts them)"
    else:
        from fwdfed.handshake import new_device_key

        issued = {}
        for device_id in args.device_id:
            private, public = new_device_key()
            issued[device_id] = {"private_key": private}
            store.enrol_key(device_id, public)
        kind = "private keys"
    write_private(args.out, json.dumps(issued, indent=1))
    print(f"enrolled {len(issued)} device(s); their {kind} are in {args.out} (give each device its own)")
    return 0


def existing_store(db):
    """The store of a command that reads or changes an existing database: a missing one is not created."""
    from coordinator.store import open_store

    if "://" not in str(db) and not Path(db).is_file():
        raise UserError(f"database {db} does not exist")
    return open_store(db)


def revoke(args) -> int:
    store = existing_store(args.db)
    for device_id in args.device_id:
        print(f"{device_id}: {'revoked' if store.revoke(device_id) else 'no valid credential to revoke'}")
    return 0


def list_credentials(args) -> int:
    import time

    def when(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))

    for c in existing_store(args.db).credentials():
        kind = f"Ed25519 key {c.public_key[:16]}" if c.public_key else "bearer token (serve --allow-bearer only)"
        print(f"{c.device_id}\tenrolled {when(c.created_at)}\t{kind}\t"
              + (f"revoked {when(c.revoked_at)}" if c.revoked_at else "valid"))
    return 0


def existing_job(args):
    """The store and the job a read-only command is about; a missing database is not created."""
    store = existing_store(args.db)
    job = store.job(args.job_id) if args.job_id else store.latest_job()
    if job is None:
        raise UserError(f"{args.db} has no job {args.job_id or ''}".strip())
    return store, job


def export_adapter(args) -> int:
    import numpy as np

    from coordinator.report import best_version
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.model.peft_adapter import save_peft_adapter

    store, job = existing_job(args)
    if args.version in (None, "latest"):
        row = store.latest_version(job.id)
    elif args.version == "best":
        best = best_version(store, job)
        if best is None:
            raise UserError(f"job {job.id} has no held-out metrics to choose the best version by "
                            "(serve it with --eval-data)")
        row = store.version(job.id, best[0])
        print(f"best version: {best[0]} ({best[1]} {best[2]:.4f})")
    else:
        try:
            row = store.version(job.id, int(args.version))
        except ValueError:
            raise UserError(f"--version must be a number, 'best' or 'latest', not {args.version!r}") from None
    if row is None:
        raise UserError(f"job {job.id} has no adapter version {args.version}")
    bundle = load_bundle(job.bundle, check_program=False)
    eval_bundle = JobOptions.from_json(job.options).eval_bundle
    if args.on == "full" and eval_bundle is None:
        raise UserError(f"--on full: job {job.id} trained on {job.bundle} with no full model (serve --eval-bundle)")
    if eval_bundle is not None and args.on != "emulator":
        bundle = full_bundle(bundle, eval_bundle, check_program=False)
    save_peft_adapter(bundle, np.frombuffer(row.vector, dtype="<f4"), args.out)
    print(f"wrote job {job.id} adapter version {row.version} to {args.out}"
          + (f" (for the full model, {bundle.folder})" if bundle.folder != Path(job.bundle) else ""))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if args.command == "status":
        from coordinator.report import status_text

        print(status_text(*existing_job(args)))
        return 0
    if args.command == "plot":
        from coordinator.report import plot_metrics

        store, job = existing_job(args)
        try:
            print(f"wrote {plot_metrics(store, job, args.out)}")
        except ValueError as e:
            raise UserError(str(e)) from None
        return 0
    commands = {"serve": serve_cli.run, "export-adapter": export_adapter, "enrol": enrol, "revoke": revoke,
                "credentials": list_credentials, "keygen": bundle_keys.keygen, "sign": bundle_keys.sign,
                "verify": bundle_keys.verify,
                "operator-token": dashboard_cli.operator_token,
                "dashboard": lambda a: dashboard_cli.dashboard(a, existing_job, tls_context)}
    return commands[args.command](args)


if __name__ == "__main__":
    quiet_libraries()
    run_main(main)
