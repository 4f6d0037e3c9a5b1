"""The ``pacs-triage`` command.

``pacs-triage serve`` starts a node with the settings from the environment
(``PACS_TRIAGE_*``) and the optional TOML file; ``pacs-triage config`` prints
the effective settings. Other subcommands are added by the packages that own
them (models, cohorts, demo).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from archive.config import Settings
from archive.logs import configure_logging
from models.cli import register as register_models

logger = logging.getLogger("pacs_triage")


def _serve(args: argparse.Namespace) -> int:
    from archive.node import Node

    settings = Settings()
    configure_logging(settings.log_level)
    node = Node(settings)
    node.start()
    print(
        f"pacs-triage node {settings.ae_title} receiving DICOM on "
        f"{settings.dicom_host}:{node.dicom.port}, HTTP on "
        f"http://{settings.http_host}:{node.http.port if node.http else '-'}; "
        f"data in {settings.data_dir}",
        flush=True,
    )
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        node.stop()
    return 0


def _worker(args: argparse.Namespace) -> int:
    import os

    from archive.dispatch import worker_command

    settings = Settings()
    argv, env = worker_command(settings, limit=args.limit)
    os.execve(argv[0], argv, env)  # the Prefect worker replaces this process
    return 1


def _config(args: argparse.Namespace) -> int:
    settings = Settings()
    print(settings.model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pacs-triage`` command, with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="pacs-triage", description="AI triage archive for radiology."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a node (DICOM and HTTP services)")
    serve.set_defaults(func=_serve)
    worker = commands.add_parser(
        "worker", help="run a Prefect worker for triage runs (distributed mode, PREFECT_API_URL)"
    )
    worker.add_argument("--limit", type=int, default=None, help="flow runs at once")
    worker.set_defaults(func=_worker)
    config = commands.add_parser("config", help="print the effective settings as JSON")
    config.set_defaults(func=_config)
    register_models(commands)
    from archive.demo import add_parser as add_demo_parser

    add_demo_parser(commands)
    from archive.cohort_cli import add_parser as add_cohort_parser

    add_cohort_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacs-triage`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # Block the signals before any thread starts so sigwait receives them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
