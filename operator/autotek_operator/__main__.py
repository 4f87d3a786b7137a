"""Command line: ``autotek-operator run`` (the operator) and ``autotek-operator demo``."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from . import __version__, logs
from . import config as config_mod


def run(settings: config_mod.Settings) -> int:
    """Run the operator against the current kubeconfig or the in-cluster service account."""
    import kopf

    from . import handlers

    handlers.configure(settings)
    # What is loaded by now (kopf, the kubernetes client and its models) lives as long as the
    # process: keep it out of the garbage collector's full scans, which pause every thread.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    # The probes (/healthz, /readyz) are served by handlers.startup, not kopf's liveness endpoint.
    kopf.run(
        standalone=True,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        identity=handlers.identity(),  # type: ignore[arg-type]
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="autotek-operator",
        description="Keeps AutoTek OAuth 2.0 bearer tokens fresh in Kubernetes Secrets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the operator (settings come from AUTOTEK_* environment variables)")
    demo = sub.add_parser(
        "demo",
        help="run the real operator against an embedded Kubernetes API emulator and a local token endpoint",
    )
    demo.add_argument("--lifetime", type=int, default=30, help="token lifetime in seconds (default 30)")
    demo.add_argument(
        "--rotations", type=int, default=0, help="stop after this many rotations (default: run until interrupted)"
    )
    args = parser.parse_args(argv)

    try:
        settings = config_mod.from_env()
    except config_mod.ConfigError as exc:
        print(f"autotek-operator: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "run":
        return run(settings)
    from .dev.demo import run_demo

    return run_demo(lifetime=args.lifetime, rotations=args.rotations)


if __name__ == "__main__":
    sys.exit(main())
