"""What `python -m coordinator serve`'s flags mean together: their checks, and the job's hyperparameters,
options and strategy made from them (coordinator.serve_cli declares the flags and starts the job)."""

from __future__ import annotations

import math

from coordinator import strategies
from coordinator.job import JobOptions
from fwdfed import methods
from fwdfed import task_keys as keys
from fwdfed.directions import MAX_SEED_POOL, pool_key
from fwdfed.errors import UserError
from fwdfed.methods.estimate import MAX_LOCAL_STEPS, StepConfig


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
        "--over-select must be a number >= 0 (0.3: task 30% more devices than the round takes)":
            math.isfinite(args.over_select) and args.over_select >= 0,
        "--min-available must be at least --devices-per-round":
            args.min_available is None or args.min_available >= args.devices_per_round,
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
    return JobOptions(head_init=args.head_init, lda_shrinkage=args.lda_shrinkage, fraction=args.fraction,
                      over_select=args.over_select, min_available=args.min_available,
                      lr_strategy=args.lr_strategy, lr_delta=args.lr_delta,
                      blocks=args.blocks, perturb_only=args.perturb_only, variance_threshold=args.variance_threshold,
                      max_waves=args.max_waves,
                      server_lr=1.0 if args.server_lr is None else args.server_lr, clip=args.clip,
                      strategy=args.strategy, strategy_options=args.strategy_options,
                      eval_bundle=str(args.eval_bundle.resolve()) if args.eval_bundle else None,
                      seed_pool=args.seed_pool,
                      seed_pool_key=None if args.seed_pool is None else f"{pool_key(args.job_id):016x}",
                      tensor_scale=args.tensor_scale, tensor_scale_floor=args.tensor_scale_floor)
