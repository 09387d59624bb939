"""`python -m coordinator serve`: its flags, and starting (or resuming) the job (their checks, and the job they
make: coordinator.serve_args).

    python -m coordinator serve --db runs/job.db --port 8765 --bundle bundles/stories \\
        --eval-data ../shared/data/tinystories/train_head.txt --rounds 5 --devices-per-round 3

Restarting `serve` on the same --db resumes the unfinished job where it stopped, with the options
the job stored.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

from coordinator import lr_strategies, strategies
from coordinator.dashboard import cli as dashboard_cli
from coordinator.job import DEFAULT_MAX_UPDATE_RMS, JobOptions, resumed_options
from coordinator.serve_args import job_hparams, job_options, round_blocks
from fwdfed import methods
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE
from fwdfed.directions import KINDS
from fwdfed.errors import UserError, first_line
from fwdfed.net import is_loopback
from fwdfed.tensor_scale import DEFAULT_FLOOR
from fwdfed.tensor_scale import MODES as TENSOR_SCALE_MODES


def add_command(commands) -> None:
    s = commands.add_parser("serve", help="run (or resume) a job's rounds")
    s.add_argument("--db", required=True, help="SQLite file path or SQLAlchemy database URL")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    s.add_argument("--bundle", type=Path, help="exported bundle (required for a new job)")
    s.add_argument("--job-id", default="job-1")
    s.add_argument("--eval-data", type=Path, help="data file whose held-out split is evaluated every round")
    s.add_argument("--eval-examples", type=int, default=256)
    s.add_argument("--eval-bundle", type=Path,
                   help="offsite tuning: evaluate (and export) on this bundle, the full model, while the devices "
                        "train on --bundle, its emulator (python -m export --emulator; docs/offsite.md)")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--devices-per-round", type=int, default=3)
    s.add_argument("--min-devices", type=int, help="fewest updates that close a round (default: devices per round)")
    s.add_argument("--fraction", type=float, help="sample this share of the connected devices each round "
                   "(at least --min-devices) instead of --devices-per-round")
    s.add_argument("--over-select", type=float, default=0.0, metavar="F",
                   help="task ceil(N x (1 + F)) devices a round, N its target (--devices-per-round or --fraction's), "
                        "and stop collecting once N updates are in: the others are late (default 0)")
    s.add_argument("--min-available", type=int, metavar="N",
                   help="task nobody until N devices are connected (Flower's min_available_clients): the same "
                        "connected fleet then gets the same sample for the same --seed, however its devices came")
    s.add_argument("--round-deadline", type=float, default=300.0, help="seconds a round waits for devices and updates")
    s.add_argument("--max-attempts", type=int, default=3, help="failed attempts of one round before the job stops")
    s.add_argument("--method", choices=methods.names(selectable_only=True), default="mezo",
                   help="; ".join(f"{m.name}: {m.summary}" for m in methods.METHODS.values() if m.selectable))
    s.add_argument("--head-init", choices=("none", "lda"), default="none",
                   help="lda: round 1 collects class statistics through the program's features method and sets "
                        "the classifier to their linear discriminant (fwdfed/methods/class_stats.py); the training "
                        "rounds follow")
    s.add_argument("--lda-shrinkage", type=float, default=DEFAULT_SHRINKAGE,
                   help="--head-init lda: shrink the pooled covariance towards a multiple of the identity by this "
                        "much, in [0, 1]")
    s.add_argument("--teacher-bundle", type=Path,
                   help="methods that distil (fedkd): the teacher's inference-only bundle; tasks name its program by "
                        "sha256, and a device holding another teacher refuses them")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--eps", type=float, default=1e-2, help="perturbation size (FwdLLM's h for fwdgrad)")
    s.add_argument("--local-steps", type=int, default=50, help="MeZO steps (fwdgrad: batches) per device per round")
    s.add_argument("--directions", type=int, help="directions per step (default: the method's: " +
                   ", ".join(f"{m.name} {m.default_directions}" for m in methods.METHODS.values()) + ")")
    s.add_argument("--kind", choices=KINDS, help="direction kind (default: the method's: " +
                   ", ".join(f"{m.name} {m.default_kind}" for m in methods.METHODS.values()) + ")")
    added = set()
    for method in methods.METHODS.values():  # each method's own task hyperparameters
        for h in method.hparams:
            if h.name not in added:
                added.add(h.name)
                s.add_argument(h.flag, type=h.type, default=h.default, choices=h.choices, help=h.help)
    s.add_argument("--variance-threshold", type=float,
                   help="fwdgrad: ask for more perturbations while the round's estimate variance is above this")
    s.add_argument("--max-waves", type=int, default=3,
                   help="fwdgrad: waves of perturbations per round at most, the first included")
    s.add_argument("--lr-strategy", choices=lr_strategies.STRATEGIES,
                   default="frozen", help="FedMeZO client learning rates")
    s.add_argument("--lr-delta", type=float, help="spread of the client learning rates (default lr / 2)")
    s.add_argument("--blocks", type=int, default=1, help="block-cyclic: perturb one of this many adapter blocks per round")
    s.add_argument("--perturb-only", metavar="NAME",
                   help="every round perturbs and updates only the adapter tensors whose names contain NAME (e.g. "
                        "classifier: the head alone, whose loss curvature differs most from the LoRA tensors')")
    s.add_argument("--seed-pool", type=int, metavar="K",
                   help="FedKSeed: every direction of the job is one of K seeds the job fixes (docs/directions.md), so "
                        "a round aggregates at most K directions whatever the number of updates (stored with the job)")
    s.add_argument("--tensor-scale", choices=TENSOR_SCALE_MODES, default="none",
                   help="rms: every direction multiplied per adapter tensor by the tensor's RMS in the round's base "
                        "adapter (at least --tensor-scale-floor), normalised to RMS 1, so that a large head and a "
                        "near-zero LoRA are perturbed at comparable relative size (fwdfed.tensor_scale; stored with "
                        "the job); none: unscaled (the default)")
    s.add_argument("--tensor-scale-floor", type=float, default=DEFAULT_FLOOR,
                   help=f"--tensor-scale rms: the least RMS a tensor counts as (default {DEFAULT_FLOOR:g})")
    s.add_argument("--strategy", choices=strategies.names(),
                   help="the aggregation rule (default: the one whose options are given, else fedavg; stored with the "
                        "job): " + "; ".join(f"{r.name}: {r.summary}" for r in strategies.STRATEGIES.values()))
    for spec in strategies.STRATEGIES.values():  # each strategy's own options
        for o in spec.options:
            s.add_argument(o.flag, type=o.type, help=f"--strategy {spec.name}: {o.help}" +
                           ("" if o.default is None else f" (default {o.default:g})"))
    s.add_argument("--server-lr", type=float, help="the aggregate moves the adapter by this times the weighted mean "
                   "change (default 1; stored with the job)")
    s.add_argument("--sqlite-sync", choices=("full", "normal"), default="full",
                   help="full: an acknowledged update survives power loss; normal: only a crash of this process")
    s.add_argument("--clip", type=float, help="bound on the L2 norm of each device's coefficients (stored with the job)")
    s.add_argument("--heartbeat", type=float, default=10.0, help="seconds between pings; no pong in as long: gone")
    s.add_argument("--device-timeout", type=float, default=30.0,
                   help="seconds a tasked device may be away before its task goes to another device")
    s.add_argument("--seed", type=int, default=0, help="seed of device sampling")
    s.add_argument("--dashboard", type=dashboard_cli.address, metavar="HOST:PORT",
                   help="serve the operator's live page here too (PORT alone: loopback; docs/dashboard.md)")
    security = s.add_argument_group("security")
    security.add_argument("--auth", choices=("token", "none"), default="token",
                          help="token: only devices enrolled with `enrol` may connect (default); none: anyone may")
    security.add_argument("--allow-bearer", action="store_true",
                          help="also accept the bearer tokens of `enrol --bearer` (replayable: for one release, while "
                               "devices move to the key challenge-response; docs/security.md)")
    security.add_argument("--cert", type=Path, help="TLS certificate chain (PEM): serve wss://")
    security.add_argument("--key", type=Path, help="the certificate's private key (PEM)")
    security.add_argument("--max-connections", type=int, default=10_000)
    security.add_argument("--max-messages-per-s", type=float, default=5.0,
                          help="per device, sustained (bursts of 20); faster devices are disconnected")
    security.add_argument("--max-update-rms", type=float, default=DEFAULT_MAX_UPDATE_RMS,
                          help="refuse updates that change the adapter by more than this RMS per value (the norm of "
                               "the coefficients, a repeated seed's summed; a dense change's own RMS): finite, "
                               "default %(default)g")
    from runtime.data import add_data_arguments

    add_data_arguments(s, "evaluation data: read as the devices read theirs")


def check_distillation(student, teacher) -> None:
    """The student can take a distillation loss (its logits method) and the teacher labels its classes."""
    from runtime.teacher import check_teacher

    if "logits" not in student.manifest.program.methods:
        raise UserError(f"{student.folder} has no logits method to distil into: export the student with "
                        "`python -m export ... --distillation`")
    check_teacher(teacher, student)


def run(args) -> int:
    """Serve (or resume) the job. A database that cannot be written, now or mid-job (a full disk, a lost
    server), stops it with one line: every update acknowledged so far is stored (an ack follows its commit),
    so serving again on the same --db once it can be written resumes the job."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    try:
        return serve(args)
    except OperationalError as e:
        shown = make_url(args.db).render_as_string(hide_password=True) if "://" in args.db else args.db
        raise UserError(f"cannot write the database {shown} ({first_line(e.orig or e)}): the job stopped, every "
                        "update it acknowledged is stored; make room (or bring the database back) and serve again "
                        "on the same --db to resume") from None


def serve(args) -> int:
    from coordinator.admission import Limits
    from coordinator.server import Coordinator, JobConfig, job_from_bundle, resume_problem, serve_job
    from coordinator.store import open_store
    from fwdfed.bundle.manifest import load_bundle
    from runtime.data import data_spec
    from runtime.evaluate import Evaluator

    store = open_store(args.db, sqlite_sync=args.sqlite_sync)
    job = store.running_job()
    if job is None:
        if args.bundle is None:
            raise UserError(f"{args.db} has no unfinished job; pass --bundle to start one")
        if store.job(args.job_id) is not None:
            raise UserError(f"job {args.job_id} in {args.db} has already finished; pass another --job-id")
        bundle = load_bundle(args.bundle)
        if args.eval_bundle is not None:
            full_bundle(bundle, args.eval_bundle)  # a pair that does not belong together is refused before the job
        if args.head_init == "lda":
            check_head_init(bundle, args.lda_shrinkage)
        if args.teacher_bundle is not None:
            check_distillation(bundle, load_bundle(args.teacher_bundle))
        head_rounds = 1 if args.head_init == "lda" else 0
        config = JobConfig(rounds=args.rounds + head_rounds, devices_per_round=args.devices_per_round,
                           min_devices=args.min_devices,
                           round_deadline_s=args.round_deadline, hparams=job_hparams(args, bundle.manifest.layout),
                           method=args.method,
                           options=job_options(args))
        block_bounds = round_blocks(bundle.manifest.layout, config.options, config.hparams)  # refused before the job is stored
        job = store.create_job(job_from_bundle(args.job_id, str(args.bundle.resolve()), bundle.manifest, config),
                               bundle.initial_adapter())
        options = config.options
        print(f"job {job.id}: {job.rounds} rounds of {job.devices_per_round} devices on {args.bundle}", flush=True)
    else:
        bundle = load_bundle(job.bundle)
        # The job runs on as it started: its stored options win over this command's flags.
        options, warnings = resumed_options(job.options, {"server_lr": args.server_lr, "clip": args.clip,
                                                          "seed_pool": args.seed_pool})
        if options.to_json() != job.options:
            job = store.set_job_options(job.id, options.to_json())
        if args.eval_bundle is not None and str(args.eval_bundle.resolve()) != options.eval_bundle:
            warnings.append(f"ignoring --eval-bundle {args.eval_bundle}: job was created with {options.eval_bundle}")
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        if (problem := resume_problem(store, job)) is not None:
            raise UserError(f"{args.db}: {problem}")
        print(f"job {job.id}: resuming after round {store.closed_rounds(job.id)} of {job.rounds}", flush=True)
        block_bounds = round_blocks(bundle.manifest.layout, options, job.hparams)
    if options.seed_pool is not None:
        print(f"seed pool: every direction is one of {options.seed_pool} seeds (key {options.seed_pool_key})",
              flush=True)
    if options.perturb_only:
        start, end = block_bounds[0]
        print(f"every round perturbs only the adapter tensors named *{options.perturb_only}*: [{start}, {end}) of "
              f"{bundle.manifest.adapter_dim}", flush=True)
    evaluated = bundle
    if options.eval_bundle is not None:
        evaluated = full_bundle(bundle, options.eval_bundle)
        record = bundle.manifest.emulator
        print(f"offsite tuning: devices train on the emulator (blocks {record.kept_layers} of "
              f"{record.full_layers}); held-out metrics on the full model {options.eval_bundle}", flush=True)
    evaluate = None
    if args.eval_data:
        spec = data_spec(args, evaluated.manifest.model.num_labels)
        evaluate = Evaluator(evaluated, args.eval_data, args.eval_examples, spec=spec)
    limits = Limits(require_credentials=args.auth == "token", allow_bearer=args.allow_bearer,
                    max_connections=args.max_connections,
                    messages_per_s=args.max_messages_per_s, max_update_rms=args.max_update_rms)
    if limits.require_credentials and not store.credentials():
        print(f"warning: no device is enrolled in {args.db}: run `python -m coordinator enrol` "
              "(or serve with --auth none)", file=sys.stderr, flush=True)
    if args.cert is None and not is_loopback(args.host):
        print(f"warning: serving {args.host} without TLS: credentials and adapters cross the network in the clear; "
              "pass --cert and --key", file=sys.stderr, flush=True)
    coordinator = Coordinator(store, job, strategy_for(job, options, bundle.manifest.layout), evaluate, seed=args.seed,
                              max_attempts=args.max_attempts, blocks=block_bounds, device_timeout_s=args.device_timeout,
                              limits=limits, layout=bundle.manifest.layout)
    tls = tls_context(args.cert, args.key) if args.cert else None
    run = serve_job(coordinator, args.host, args.port, heartbeat_s=args.heartbeat, tls=tls,
                    ready=lambda url: print(f"listening on {url}", flush=True))
    if args.dashboard is not None:
        from coordinator.dashboard.app import alongside

        run = alongside(run, args.db, job.id, args.dashboard, tls)
    # A coordinator keeps hundreds of thousands of objects alive (dozens per connection, the open round's tasks):
    # at the default thresholds a full collection, a pause of half a second at 5,000 devices, came every thousand
    # updates or so (benchmarks/coordinator_load.py). Young objects are collected every 50,000 allocations instead.
    gc.set_threshold(50_000, 20, 10)
    ok = asyncio.run(run)
    if not ok:
        print(f"error: job {job.id} stopped: a round failed {args.max_attempts} times in a row", file=sys.stderr)
        return 1
    print(f"job {job.id} finished", flush=True)
    return 0


def full_bundle(emulator, path, check_program: bool = True):
    """The full model's bundle of an offsite-tuning job, checked against the emulator the devices train on."""
    from fwdfed.bundle.manifest import load_bundle
    from fwdfed.model.emulator import check_pair

    full = load_bundle(path, check_program=check_program)
    check_pair(emulator.manifest, full.manifest, path)
    return full


def check_head_init(bundle, shrinkage: float) -> None:
    """--head-init lda needs a classifier whose head is in the adapter and a program with features."""
    from fwdfed.methods.class_stats import round_hparams

    if "features" not in bundle.manifest.program.methods:
        raise UserError(f"--head-init lda: {bundle.folder} has no features method (export the classifier again)")
    try:
        round_hparams(bundle.manifest.layout, shrinkage)
    except ValueError as e:
        raise UserError(f"--head-init lda: {e}") from None


def strategy_for(job, options: JobOptions, layout):
    """The job's strategy, as the job stored it, said once for the operator."""
    strategy = strategies.build(job, options, layout)
    shown = ", ".join(f"{name} {value:g}" for name, value in options.strategy_options.items())
    print(f"strategy {options.strategy}" + (f" ({shown})" if shown else ""), flush=True)
    if options.strategy == "dp-fedavg":
        epsilon = strategy.round_metrics(job.rounds)["dp_epsilon"]
        print(f"differential privacy: ({epsilon:.3g}, {strategy.delta:g})-DP per device after {job.rounds} rounds",
              flush=True)
    return strategy


def tls_context(cert: Path, key: Path):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise UserError(f"cannot use the certificate {cert} with key {key}: {e}") from None
    return context
