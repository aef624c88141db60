"""regsweep command line: run, resume, extend, check, report, server.

Exit codes: 0 done; 2 the spec or the preflight was refused (nothing started, nothing
written); 130 interrupted; 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
LOCAL_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _printer() -> Callable[[str], None]:
    start = time.monotonic()

    def say(line: str) -> None:
        elapsed = int(time.monotonic() - start)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}", flush=True)

    return say


def _load(path: str, smoke: bool = False, trials: int | None = None):
    from sweeps.spec import load_spec

    spec = load_spec(path)
    if trials is not None:
        from sweeps.spec import parse_spec

        data = spec.model_dump(mode="json")
        data["search"]["num_trials"] = trials
        spec = parse_spec(data, source=f"spec file {path!r} with --trials {trials}")
    return spec.smoke() if smoke else spec


def cmd_check(args: argparse.Namespace) -> int:
    spec = _load(args.spec, args.smoke_test)
    print(f"{args.spec}: valid sweep spec {spec.name!r}")
    for key, value in spec.flat_params().items():
        print(f"  {key} = {value}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args.spec, args.smoke_test, args.trials)
    from sweeps.launch import resolve_tracking_uri, run_sweep

    say = _printer()
    say(
        f"sweep {spec.name!r}: {spec.search.num_trials} trials of {spec.model.name} on "
        f"{spec.dataset.name}, {spec.training.epochs} epochs, at most "
        f"{spec.resources.max_concurrent_trials} at once"
        + (" (smoke test)" if args.smoke_test else "")
    )
    uri = resolve_tracking_uri(spec, args.tracking_uri)
    result = run_sweep(
        spec,
        spec_path=args.spec,
        tracking_uri=uri,
        storage_path=args.storage_path,
        address=args.address,
        progress=say,
    )
    return _finish(result, spec.experiment, args.top, say)


def _sweep_location(args: argparse.Namespace) -> tuple[str, str | None]:
    """Tracking URI and experiment of the sweep that report, resume or extend reads.

    The URI as for `run` (--tracking-uri, $MLFLOW_TRACKING_URI, the spec's, SQLite); the
    experiment from --experiment or the spec, else None: the store's latest sweep.
    """
    from sweeps.launch import DEFAULT_TRACKING_URI

    spec = _load(args.spec) if args.spec else None
    uri = (
        args.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (spec.tracking.uri if spec else None)
        or DEFAULT_TRACKING_URI
    )
    experiment = args.experiment or (spec.experiment if spec else None)
    return uri, experiment


def cmd_resume(args: argparse.Namespace) -> int:
    from sweeps.launch import resume_sweep

    uri, experiment = _sweep_location(args)
    say = _printer()
    result = resume_sweep(
        uri,
        run_id=args.run_id,
        experiment=experiment,
        address=args.address,
        progress=say,
        retry_errored=args.retry_errored,
        force=args.force,
    )
    return _finish(result, experiment, args.top, say)


def cmd_extend(args: argparse.Namespace) -> int:
    from sweeps.launch import extend_sweep

    uri, experiment = _sweep_location(args)
    say = _printer()
    result = extend_sweep(
        uri,
        args.trials,
        run_id=args.run_id,
        experiment=experiment,
        storage_path=args.storage_path,
        address=args.address,
        progress=say,
    )
    return _finish(result, experiment, args.top, say)


def _finish(result, experiment: str | None, top: int, say) -> int:
    """Print the sweep's outcome, its best trials read back from MLflow, and where it is."""
    import mlflow
    import pandas as pd

    from sweeps import analysis
    from sweeps.launch import extend_command, resume_command

    say(f"sweep {result.status}: trials by outcome {result.outcomes}")
    mlflow.set_tracking_uri(result.tracking_uri)
    frame = analysis.trials_frame(result.parent_run_id, [result.experiment_id])
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print("\nBest trials (final epoch, read back from MLflow):")
        table = analysis.best_trials(frame, top=top, best_run_id=result.best.get("run_id"))
        print(table.to_string(index=False, float_format="{:.4g}".format))
    if result.best:
        b = result.best
        print(
            f"\nBest trial {b['trial_id']}: val_acc {b['val_acc']:.4f}, test_acc "
            f"{b['test_acc']:.4f} (dropout {b['dropout']:.3g}, weight_decay "
            f"{b['weight_decay']:.3g}, survival_prob {b['survival_prob']:.3g})"
        )
        print(f"Best model: {b.get('registered', b['model_uri'])}")
    where = f" in experiment {experiment!r}" if experiment else ""
    print(f"MLflow sweep run: {result.parent_run_id}{where}")
    print(f"Open the UI: {analysis.ui_command(result.tracking_uri)}")
    resume = resume_command(result.tracking_uri, result.parent_run_id)
    if result.status == "KILLED":
        print(f"Continue it: {resume}")
        return EXIT_INTERRUPTED
    if result.status == "FAILED":
        print(
            "error: no trial trained successfully; see the outcome and error tags above",
            file=sys.stderr,
        )
        if result.outcomes["error"]:
            print(f"Once the cause is fixed, retry its trials: {resume} --retry-errored")
        if result.outcomes["diverged"]:
            extend = extend_command(result.tracking_uri, result.parent_run_id)
            print(f"Or add trials, proposed by a TPE that learned from these: {extend}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Tables of a sweep read back from MLflow: best trials, then the swept values' effects at
    one epoch that the trials can be compared at (see analysis.comparison_epoch).

    Exit 2 for a bad option value, before anything is read. An epoch that no trial reached is
    not an error: the report says how far the trials got and leaves out the comparison.
    """

    def refuse(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_REFUSED

    if args.epoch is not None and args.epoch < 1:
        return refuse(f"--epoch {args.epoch}: give an epoch >= 1 (epochs count from 1)")
    if args.plot:
        plot = Path(args.plot).expanduser()
        if plot.is_dir():
            return refuse(f"--plot {args.plot}: is a folder; give a file such as trials.png")
        if not plot.parent.is_dir():
            return refuse(
                f"--plot {args.plot}: the folder {plot.parent} does not exist; create it or "
                "give a file in an existing folder"
            )
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix and plot.suffix[1:].lower() not in formats:
            return refuse(
                f"--plot {args.plot}: matplotlib cannot write {plot.suffix!r} files; give one "
                f"ending in {', '.join('.' + f for f in sorted(formats))} (PNG if none)"
            )

    import mlflow
    import pandas as pd

    from sweeps import analysis, tracking

    uri, experiment = _sweep_location(args)
    _, run = tracking.open_sweep_run(uri, args.run_id, experiment)
    mlflow.set_tracking_uri(uri)
    run_id = run.info.run_id
    frame = analysis.trials_frame(run_id, [run.info.experiment_id])
    epoch, why = analysis.comparison_epoch(run.data.params, args.epoch)
    compared = analysis.at_epoch(frame, epoch)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"sweep run {run_id}: {len(frame)} trials")
        best_run_id = run.data.tags.get("best_run_id")
        table = analysis.best_trials(frame, top=args.top, best_run_id=best_run_id)
        print(table.to_string(index=False))
        print(f"\nComparing trials at epoch {epoch}: {why}")
        if compared.empty:
            print(f"no trial reached epoch {epoch} ({analysis.epochs_reached(frame)})")
        else:
            print(f"At epoch {epoch}, over the {len(compared)} trials that reached it:")
            print("Spearman rank correlation of each swept value with val_acc and gen_gap")
            print(analysis.effects(compared).to_string(index=False))
            if len(compared) >= 4:
                print("fANOVA importance for val_acc (Optuna)")
                print(analysis.importance(compared).to_string())
            else:
                print(
                    f"fANOVA importance skipped: it needs at least 4 trials at epoch {epoch}, "
                    f"{len(compared)} reached it"
                )
    if args.plot:
        print(f"plot: {analysis.plot_trials(frame, args.plot)}")
    print(f"Open the UI: {analysis.ui_command(uri)}")
    return EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    """Replace this process with `mlflow server`: a SQL backend and artifacts it serves itself.

    Drivers then log everything, artifacts included, over HTTP, so no node needs the server's
    disk. Without --allowed-hosts MLflow's own default applies: localhost on any port (an SSH
    tunnel) and private addresses (a cluster's nodes); other Host headers are refused.
    """
    from sweeps.tracking import TrackingError, check_server_backend

    # Refuse what `mlflow server` would only log before exiting 0 (a port in use) or turn
    # into a traceback (a bad backend URI), so that a script or `nohup ... &` can tell.
    try:
        check_server_backend(args.backend_store_uri)
    except TrackingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    problem = _server_port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_REFUSED

    artifacts = args.artifacts_destination
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: --host {args.host} accepts connections from the network and MLflow asks "
            "for no password; on a cluster head prefer 127.0.0.1 and an SSH tunnel",
            flush=True,
        )
    # MLflow's job runner (GenAI scorers, prompt optimization) is of no use to sweeps and
    # starts a pool of extra processes; set the variable to "true" to have it anyway.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow server at http://{args.host}:{args.port}", flush=True)
    print("starting:", " ".join(command), flush=True)
    os.execv(sys.executable, command)
    return EXIT_FAILED  # not reached


def _server_port_problem(host: str, port: int) -> str | None:
    """Why `mlflow server` could not listen at host:port, or None if it can."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        return f"--host {host!r} is not an address of this machine: {error}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server will: an address left in TIME_WAIT by a stopped server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return (
                f"cannot listen at {host}:{port} ({error.strerror or error}): choose a free "
                "--port, or stop what listens there"
            )
    return None


def _non_empty(text: str) -> str:
    """An argparse type: a string that is not empty (an empty one would mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("'' is not allowed: leave the option out for the default")
    return text


def _int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None
        if value < low or (high is not None and value > high):
            allowed = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is not allowed: {what}, {allowed}")
        return value

    return parse


_ROWS = _int_in(1, None, "rows of the table")


def _add_where_options(command: argparse.ArgumentParser) -> None:
    """--address and --tracking-uri, for the commands that drive a sweep."""
    command.add_argument(
        "--address", type=_non_empty, help="Ray cluster to join (default: $RAY_ADDRESS or local)"
    )
    command.add_argument(
        "--tracking-uri", type=_non_empty, help="MLflow tracking URI (overrides env and spec)"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweeps", description="Regularization sweeps of ResNets on Ray Tune."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a sweep from a spec file")
    run.add_argument("spec", help="path to a YAML sweep spec, e.g. sweeps/specs/digits.yaml")
    run.add_argument("--smoke-test", action="store_true", help="at most 3 trials of 2 epochs")
    run.add_argument("--trials", type=int, help="override search.num_trials")
    _add_where_options(run)
    run.add_argument(
        "--storage-path", type=_non_empty, help="Tune storage path (overrides storage.path)"
    )
    run.add_argument("--top", type=_ROWS, default=5, help="rows in the final table, >= 1")
    run.set_defaults(func=cmd_run)

    for name, helptext in (
        ("resume", "continue an interrupted or crashed sweep in the same MLflow runs"),
        ("extend", "add trials to a finished sweep, the searcher warm-started by it"),
    ):
        cont = sub.add_parser(name, help=helptext)
        cont.add_argument(
            "spec", nargs="?", help="spec whose experiment holds the sweep (its latest sweep)"
        )
        cont.add_argument(
            "--experiment", type=_non_empty, help="experiment name (default: the spec's)"
        )
        cont.add_argument(
            "--run-id", type=_non_empty, help="the sweep's parent run id (default: the latest)"
        )
        _add_where_options(cont)
        cont.add_argument("--top", type=_ROWS, default=5, help="rows in the final table, >= 1")
        if name == "resume":
            cont.add_argument(
                "--retry-errored",
                action="store_true",
                help="also resume trials that raised, from their last checkpoint",
            )
            cont.add_argument(
                "--force",
                action="store_true",
                help="take over a RUNNING sweep whose driver cannot be checked (other host)",
            )
            cont.set_defaults(func=cmd_resume)
        else:
            cont.add_argument("--trials", type=int, required=True, help="trials to add, >= 1")
            cont.add_argument(
                "--storage-path", type=_non_empty, help="Tune storage path for the new trials"
            )
            cont.set_defaults(func=cmd_extend)

    check = sub.add_parser("check", help="validate a spec file without running it")
    check.add_argument("spec")
    check.add_argument("--smoke-test", action="store_true")
    check.set_defaults(func=cmd_check)

    report = sub.add_parser("report", help="tables (and a plot) of a finished sweep")
    report.add_argument("spec", nargs="?", help="spec whose experiment to report")
    report.add_argument(
        "--experiment", type=_non_empty, help="experiment name (default: the spec's)"
    )
    report.add_argument(
        "--run-id", type=_non_empty, help="sweep parent run id (default: the latest)"
    )
    report.add_argument(
        "--tracking-uri", type=_non_empty, help="MLflow tracking URI (overrides env and spec)"
    )
    report.add_argument(
        "--top", type=_ROWS, default=10, help="rows in the best-trials table, >= 1"
    )
    report.add_argument(
        "--epoch",
        type=int,
        help="epoch >= 1 at which to compare trials (default: ASHA's first rung, "
        "scheduler.grace_period; under FIFO the final epoch, training.epochs)",
    )
    report.add_argument(
        "--plot", help="write a PNG of final val_acc against each swept value to this file"
    )
    report.set_defaults(func=cmd_report)

    server = sub.add_parser("server", help="start an MLflow tracking server for sweeps")
    server.add_argument(
        "--backend-store-uri",
        default="sqlite:///mlflow.db",
        help="sqlite:///PATH or postgresql://USER@HOST/DB (default: sqlite:///mlflow.db)",
    )
    server.add_argument(
        "--artifacts-destination",
        default="mlartifacts",
        help="directory or s3://... where the server keeps artifacts (default: mlartifacts)",
    )
    server.add_argument("--host", default="127.0.0.1", help="bind address (keep loopback)")
    server.add_argument(
        "--port", type=_int_in(1, 65535, "a TCP port"), default=5000, help="(default: 5000)"
    )
    server.add_argument(
        "--workers",
        type=_int_in(1, None, "server worker processes"),
        default=2,
        help="server worker processes (default: 2)",
    )
    server.add_argument(
        "--allowed-hosts",
        help="comma-separated Host headers to accept (default: MLflow's, localhost on any "
        "port and private addresses)",
    )
    server.set_defaults(func=cmd_server)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # One line per failed MLflow request is enough; urllib3 adds one per retry.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
        # A progress bar per artifact read back (the stored spec of a resumed sweep).
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # Start-up lines of the libraries, not of this sweep: MLflow creating its tables in a
        # new store, Ray saying token authentication is on (regsweep sets it up).
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
    drives_sweep = args.command in ("run", "resume", "extend")
    if drives_sweep:
        # First, so that no signal is lost while Ray and MLflow load (sweeps.interrupts).
        from sweeps import interrupts

        interrupts.install()
        if not args.verbose:
            import optuna

            # Optuna logs "A new study created in memory" at INFO to its own handler.
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            # The local Ray started for this sweep alone listens on loopback only. Ray reads
            # this switch when it is imported (on Linux it otherwise binds the machine's
            # outward address so that other nodes could join).
            os.environ.setdefault(LOCAL_RAY_ENV, "0")
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except BaseException:
        if drives_sweep and interrupts.received():
            # A signal tore through Ray's or MLflow's start-up code, whatever it raised there.
            print("interrupted before the sweep started: nothing was recorded", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    finally:
        if drives_sweep:
            interrupts.finished()


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; turn the errors a user can fix into a message and an exit code."""
    from sweeps.data import DatasetError
    from sweeps.launch import PreflightError
    from sweeps.spec import SpecError
    from sweeps.tracking import StoreLost, TrackingError, use_driver_http_settings

    if args.command in ("run", "resume", "extend"):
        use_driver_http_settings()
    try:
        return args.func(args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except PreflightError as error:
        print(f"error: preflight failed, nothing was started: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except TrackingError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except DatasetError as error:
        print(
            f"error: the dataset could not be staged, no trial was started: {error}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    except StoreLost as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as error:
        print(f"interrupted ({error})" if str(error) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
