"""The ``photd`` command line: thin wrappers over library functions.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from photd.config import Config, ConfigError, find_config_path, load_config, with_overrides

EXAMPLES = """examples:
  photd demo --small                       simulate a small night and process it live
  photd simulate night1 --small --seed 3   write a simulated night into night1/
  photd run --watch night1/raw --work w --catalog night1/catalog.ecsv --until-idle 20
  photd status --work w --json
  photd export OJ287 --band r --format csv -o oj287_r.csv --work w
  photd export OJ287 --format aavso --observer-code XYZ -o oj287.txt --work w
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="photd", description="Unattended photometry daemon for the Xinglong 1.26 m telescope.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, work: bool = True) -> None:
        sp.add_argument("--config", help="configuration file (default: $PHOTD_CONFIG, "
                        "else ./config.toml)")
        if work:
            sp.add_argument("--work", help="work folder holding the store, processed frames, "
                            "masters and caches")

    sp = sub.add_parser("demo", help="simulate a night and process it live; print the light "
                        "curve; write a plot")
    sp.add_argument("--dir", help="folder for the simulated night and its processing "
                    "(default: a new temporary folder)")
    sp.add_argument("--small", action="store_true", help="507 x 671 px frames (5x5 binned)")
    sp.add_argument("--full", action="store_true", help="full-size 2536 x 3358 px frames")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--frames", type=int, default=10, help="science frames per target "
                    "(default 10)")

    sp = sub.add_parser("simulate", help="write a simulated night (frames, log, catalog, truth)")
    sp.add_argument("outdir")
    sp.add_argument("--small", action="store_true", help="507 x 671 px frames (5x5 binned)")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--arrival", type=float, metavar="SECONDS",
                    help="write one exposure (three cameras) every SECONDS, in chunks")
    sp.add_argument("--frames", type=int, default=30, help="science frames per target and band "
                    "(default 30: 60 a band)")
    sp.add_argument("--layout", choices=("folders", "names"), default="folders",
                    help="one folder per camera (raw/g/...) or band in the file name")
    sp.add_argument("--log", choices=("end", "start", "growing"), default="end",
                    help="when the observing log is written (default: end of night)")

    sp = sub.add_parser("run", help="the daemon")
    common(sp)
    sp.add_argument("--watch", action="append", metavar="DIR", help="camera folder to watch "
                    "(repeatable)")
    sp.add_argument("--catalog", help="local reference catalog (ECSV, FITS or CSV)")
    sp.add_argument("--until-idle", type=float, metavar="SECONDS",
                    help="exit 0 after SECONDS with nothing left to do")
    sp.add_argument("--workers", type=int, help="worker processes (default: cores)")

    sp = sub.add_parser("status", help="frame counts and states")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("tail", help="the newest light-curve points of a target, a table per "
                        "band (names match without case or spacing: 'oj 287' is OJ287)")
    common(sp)
    sp.add_argument("target")
    sp.add_argument("--band")
    sp.add_argument("--follow", action="store_true", help="keep updating as rows arrive")
    sp.add_argument("-n", type=int, default=15, help="rows to show (default 15)")

    sp = sub.add_parser("export", help="export a target's light curve")
    common(sp)
    sp.add_argument("target")
    sp.add_argument("--band")
    sp.add_argument("--format", choices=("csv", "ecsv", "aavso"), default="csv")
    sp.add_argument("-o", "--output", help="file to write (default: standard output)")
    sp.add_argument("--observer-code", metavar="CODE", help="AAVSO observer code for "
                    "--format aavso (default: export.observer_code of the configuration)")

    sp = sub.add_parser("plot", help="plot a target's light curve to a PNG")
    common(sp)
    sp.add_argument("target")
    sp.add_argument("--band")
    sp.add_argument("-o", "--output", help="PNG to write (default: <target>.png)")
    return p


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(find_config_path(getattr(args, "config", None)))
    paths: dict = {}
    if getattr(args, "work", None):
        paths["work"] = args.work
    if getattr(args, "watch", None):
        paths["watch"] = tuple(args.watch)
    if getattr(args, "catalog", None):
        paths["catalog"] = args.catalog
    daemon_over = {}
    if getattr(args, "workers", None) is not None:
        daemon_over["workers"] = args.workers
    return with_overrides(cfg, paths=paths, daemon=daemon_over)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``photd`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"photd: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "simulate":
        from photd.simulate import SimOptions, simulate_night

        if args.frames < 1:
            print("photd: --frames must be at least 1", file=sys.stderr)
            return 2
        opts = SimOptions(seed=args.seed, small=args.small, science_per_target=args.frames,
                          layout=args.layout, log=args.log)
        simulate_night(args.outdir, opts, arrival_s=args.arrival,
                       progress=lambda m: print(m, file=sys.stderr))
        print(Path(args.outdir) / "raw")
        return 0
    if args.command == "demo":
        from photd.demo import run_demo

        return run_demo(directory=args.dir, small=not args.full, seed=args.seed,
                        frames=args.frames)
    cfg = _config(args)
    if args.command == "run":
        from photd.service import run_daemon

        if not cfg.paths.watch:
            print("photd: nothing to watch: give --watch DIR or paths.watch in the "
                  "configuration", file=sys.stderr)
            return 2
        return run_daemon(cfg, until_idle_s=args.until_idle)
    from photd import reports

    if args.command == "status":
        return reports.status(cfg, as_json=args.json)
    if args.command == "tail":
        return reports.tail(cfg, args.target, band=args.band, follow=args.follow, n=args.n)
    if args.command == "export":
        return reports.export(cfg, args.target, band=args.band, fmt=args.format,
                              output=args.output, observer_code=args.observer_code)
    if args.command == "plot":
        return reports.plot(cfg, args.target, band=args.band, output=args.output)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
