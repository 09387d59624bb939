"""The operator's commands for the dashboard:

    python -m coordinator operator-token --db runs/job.db --out runs/operator-token
    python -m coordinator serve ... --dashboard 127.0.0.1:8766     # beside the running job
    python -m coordinator dashboard --db runs/job.db --port 8766      # any job, running or finished
    python -m coordinator dashboard --db runs/job.db --html job.html  # a finished job as one file
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fwdfed.errors import UserError

DEFAULT_PORT = 8766


def address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or PORT alone (loopback); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or PORT (0 to 65535), not {text!r}")
    return host, int(port)


def add_commands(commands) -> None:
    ot = commands.add_parser("operator-token", help="issue the token that opens the dashboard (replaces the "
                             "earlier one); written to --out, the database keeps its hash")
    ot.add_argument("--db", required=True)
    ot.add_argument("--out", type=Path, required=True, help="file to write the token to (mode 0600)")
    ot.add_argument("--name", default="operator", help="tokens are kept by name; re-issuing a name revokes its "
                    "earlier token")
    d = commands.add_parser("dashboard", help="the operator's live page of a job (read-only; an operator token "
                            "opens it), or --html: the job as one static HTML file")
    d.add_argument("--db", required=True, help="SQLite file path or SQLAlchemy database URL")
    d.add_argument("--job-id", help="default: the most recent job")
    d.add_argument("--host", default="127.0.0.1", help="loopback by default")
    d.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed)")
    d.add_argument("--cert", type=Path, help="TLS certificate chain (PEM): serve https://")
    d.add_argument("--key", type=Path, help="the certificate's private key (PEM)")
    d.add_argument("--html", type=Path, help="write the job's page, plots included, as one file and exit")


def check(parser, args) -> None:
    """The dashboard command's flags that argparse alone cannot check."""
    if args.command == "dashboard":
        if not 0 <= args.port <= 65535:
            parser.error("--port must be in [0, 65535]")
        if (args.cert is None) != (args.key is None):
            parser.error("--cert and --key go together")


def operator_token(args) -> int:
    """Like `enrol`, it may come before the first `serve`: a database that is not there yet is made."""
    from coordinator.store import open_store
    from fwdfed.cli import write_private

    if not args.name or len(args.name) > 64:
        raise UserError(f"--name must be 1 to 64 characters: {args.name!r}")
    token = open_store(args.db).issue_operator_token(args.name)
    write_private(args.out, token + "\n")
    print(f"issued operator token {args.name!r} (any earlier one of that name no longer opens the dashboard); "
          f"it is in {args.out}: open the dashboard at http://HOST:PORT/?token=$(cat {args.out})")
    return 0


def dashboard(args, existing_job, tls_context) -> int:
    import asyncio

    store, job = existing_job(args)
    if args.html is not None:
        from coordinator.dashboard.page import write_static
        from coordinator.dashboard.snapshot import snapshot

        print(f"wrote {write_static(snapshot(store, job.id), args.html)} (job {job.id}, {job.status})")
        return 0
    from coordinator.dashboard.app import serve_forever

    tls = tls_context(args.cert, args.key) if args.cert else None
    asyncio.run(serve_forever(args.db, job.id, (args.host, args.port), tls))
    return 0
