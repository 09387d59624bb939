"""`python -m coordinator serve`: its flags, their checks, and starting (or resuming) the job.

    python -m coordinator serve --db runs/job.db --port 8765 --bundle bundles/stories \\
        --eval-data ../shared/data/tinystories/train_head.txt --rounds 5 --devices-per-round 3

Restarting `serve` on the same --db resumes the unfinished job where it stopped, with the options
the job stored.
"""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

from coordinator import lr_strategies, strategies
from coordinator.dashboard import cli as dashboard_cli
from coordinator.job import DEFAULT_MAX_UPDATE_RMS, JobOptions, resumed_options
from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.methods.class_stats import DEFAULT_SHRINKAGE
from fwdfed.directions import KINDS, MAX_SEED_POOL, pool_key
from fwdfed.errors import UserError
from fwdfed.methods.estimate import MAX_LOCAL_STEPS, StepConfig
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


def check(parser, args) -> None:
    """The serve command's flags that argparse alone cannot check, and the method's own checks of them."""
    if args.command != "serve":
        return
    method = methods.get(args.method)
    if args.min_devices is None:
        args.min_devices = args.devices_per_round
    if args.directions is None:
        args.directions = method.default_directions
    if args.kind is None:
        args.kind = method.default_kind
    checks = {
        "--port must be in [0, 65535]": 0 <= args.port <= 65535,
        "--rounds, --devices-per-round, --local-steps, --directions, --max-attempts must be at least 1":
            min(args.rounds, args.devices_per_round, args.local_steps, args.directions, args.max_attempts) >= 1,
        "--min-devices must be between 1 and --devices-per-round": 1 <= args.min_devices <= args.devices_per_round,
        "--fraction must be in (0, 1]": args.fraction is None or 0 < args.fraction <= 1,
        "--lr, --eps, --server-lr and --round-deadline must be positive":
            min(args.lr, args.eps, args.round_deadline) > 0 and (args.server_lr is None or args.server_lr > 0),
        "--eval-examples must be at least 1": args.eval_examples >= 1,
        "--clip, --heartbeat and --device-timeout must be positive":
            (args.clip is None or args.clip > 0) and args.heartbeat > 0 and args.device_timeout > 0,
        "--max-waves and --blocks must be at least 1": min(args.max_waves, args.blocks) >= 1,
        "--perturb-only and --blocks go one at a time": args.perturb_only is None or args.blocks == 1,
        # Devices refuse tasks past this bound (a task is untrusted input to them).
        f"--local-steps can be at most {MAX_LOCAL_STEPS}": args.local_steps <= MAX_LOCAL_STEPS,
        "--variance-threshold and --lr-delta must be positive":
            (args.variance_threshold is None or args.variance_threshold > 0) and (args.lr_delta is None or args.lr_delta > 0),
        "--cert and --key go together": (args.cert is None) == (args.key is None),
        "--max-connections and --max-messages-per-s must be positive":
            args.max_connections >= 1 and args.max_messages_per_s > 0,
        "--max-update-rms must be positive and finite": 0 < args.max_update_rms < float("inf"),
        f"--seed-pool must be between 1 and {MAX_SEED_POOL}":
            args.seed_pool is None or 1 <= args.seed_pool <= MAX_SEED_POOL,
    }
    for message, ok in checks.items():
        if not ok:
            parser.error(message)
    try:
        args.strategy, args.strategy_options = chosen_strategy(args)
    except ValueError as e:
        parser.error(str(e))
    if method.needs_teacher != (args.teacher_bundle is not None):
        parser.error(f"--method {method.name} needs --teacher-bundle" if method.needs_teacher else
                     f"--teacher-bundle is for a method that distils (fedkd), not {method.name}")
    args.teacher_sha256 = None
    if args.teacher_bundle is not None:
        from fwdfed.bundle.manifest import load_bundle

        try:
            args.teacher_sha256 = load_bundle(args.teacher_bundle).manifest.program.sha256
        except UserError as e:
            parser.error(f"--teacher-bundle: {e}")
    if method.layout_hparams and (args.perturb_only or args.blocks > 1):
        parser.error(f"--method {method.name} perturbs the adapter without its head, one block: not with --blocks or "
                     "--perturb-only")
    if not method.layout_hparams:  # those of a method with layout hparams are checked with the bundle's (`run`)
        try:  # the method's own checks, the ones every device applies to a task
            method.config.from_hparams(job_hparams(args))
        except ValueError as e:
            parser.error(str(e))
    if (problem := tensor_scale_problem(args, method)) is not None:
        parser.error(problem)


def tensor_scale_problem(args, method) -> str | None:
    """Why --tensor-scale cannot run with the other flags, or None. Its scales multiply the directions of a
    zeroth-order step (a StepConfig's), so a method without one has nothing to scale; fedavg alone aggregates
    with them (the other rules rebuild each device's change without them), and the lr strategies and the
    variance waves that read a device's change would read it unscaled."""
    if not (math.isfinite(args.tensor_scale_floor) and args.tensor_scale_floor > 0):
        return f"--tensor-scale-floor must be a finite number > 0, got {args.tensor_scale_floor!r}"
    if args.tensor_scale == "none":
        return None
    needs = {f"--method {method.name} takes no directions": issubclass(method.config, StepConfig),
             f"--strategy {args.strategy}: only fedavg aggregates with the scales": args.strategy == strategies.DEFAULT,
             f"--lr-strategy {args.lr_strategy} reads devices' changes unscaled": args.lr_strategy != "model-diff",
             "--variance-threshold reads devices' changes unscaled": args.variance_threshold is None}
    return next((f"--tensor-scale {args.tensor_scale}: {why}" for why, ok in needs.items() if not ok), None)


def chosen_strategy(args) -> tuple[str, dict]:
    """The job's strategy and its options' values: --strategy, or the one strategy whose options are given
    (--dp-clip alone means dp-fedavg), or fedavg. ValueError for another strategy's option, or a bad value."""
    given = {spec.name: {o.name: getattr(args, o.name) for o in spec.options if getattr(args, o.name) is not None}
             for spec in strategies.STRATEGIES.values()}
    with_options = [name for name, values in given.items() if values]
    name = args.strategy or (with_options[0] if len(with_options) == 1 else strategies.DEFAULT)
    for other in with_options:
        if other != name:
            flags = ", ".join(o.flag for o in strategies.get(other).options if o.name in given[other])
            raise ValueError(f"{flags}: for --strategy {other}, not {name}")
    return name, strategies.get(name).checked(given[name])


def job_hparams(args, layout=None) -> dict:
    """The task hyperparameters of a new job: the common ones, the method's own, and those it computes from
    the bundle's `layout` (hybrid's head); UserError where the layout does not suit the method."""
    method = methods.get(args.method)
    hparams = {keys.LR: args.lr, keys.EPS: args.eps, keys.LOCAL_STEPS: args.local_steps,
               keys.DIRECTIONS: args.directions, keys.KIND: args.kind}
    if getattr(args, "teacher_sha256", None):
        hparams[keys.TEACHER_SHA256] = args.teacher_sha256
    hparams |= {h.name: getattr(args, h.name) for h in method.hparams}
    if layout is not None and method.layout_hparams:
        try:
            hparams |= method.layout_hparams(layout)
            method.config.from_hparams(hparams)
        except ValueError as e:
            raise UserError(f"--method {method.name}: {e}") from None
    return hparams


def round_blocks(layout, options: JobOptions, hparams: dict) -> list[tuple[int, int]] | None:
    """The blocks the rounds perturb in turn: the one the job's method keeps to (hybrid: the adapter without
    its head, in the job's `hparams`), one fixed block (--perturb-only), the block-cyclic split, or none."""
    if keys.BLOCK_START in hparams:
        return [(hparams[keys.BLOCK_START], hparams[keys.BLOCK_END])]
    try:
        if options.perturb_only:
            return [layout.span(options.perturb_only)]
        return layout.blocks(options.blocks) if options.blocks > 1 else None
    except ValueError as e:
        raise UserError(f"--{'perturb-only' if options.perturb_only else 'blocks'}: {e}") from None


def job_options(args) -> JobOptions:
    return JobOptions(head_init=args.head_init, lda_shrinkage=args.lda_shrinkage, fraction=args.fraction, lr_strategy=args.lr_strategy, lr_delta=args.lr_delta,
                      blocks=args.blocks, perturb_only=args.perturb_only, variance_threshold=args.variance_threshold,
                      max_waves=args.max_waves,
                      server_lr=1.0 if args.server_lr is None else args.server_lr, clip=args.clip,
                      strategy=args.strategy, strategy_options=args.strategy_options,
                      eval_bundle=str(args.eval_bundle.resolve()) if args.eval_bundle else None,
                      seed_pool=args.seed_pool,
                      seed_pool_key=None if args.seed_pool is None else f"{pool_key(args.job_id):016x}",
                      tensor_scale=args.tensor_scale, tensor_scale_floor=args.tensor_scale_floor)


def check_distillation(student, teacher) -> None:
    """The student can take a distillation loss (its logits method) and the teacher labels its classes."""
    from runtime.teacher import check_teacher

    if "logits" not in student.manifest.program.methods:
        raise UserError(f"{student.folder} has no logits method to distil into: export the student with "
                        "`python -m export ... --distillation`")
    check_teacher(teacher, student)


def run(args) -> int:
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
