"""``python -m dispatcher``: parse arguments, load settings, configure logging, run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from autoreduce_common.stomp_client import BrokerError

from dispatcher.app import run
from dispatcher.config import DispatcherSettings, load_settings
from dispatcher.logs import JsonFormatter
from dispatcher.manifests import load_template

EXIT_CONFIG = 2
EXIT_BROKER = 3


def _configure_logging(settings: DispatcherSettings) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("stomp").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="autoreduce-dispatcher", description=__doc__)
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("AUTOREDUCE_CONFIG_FILE"),
        help="YAML settings file (environment variables override it)",
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig; in-cluster credentials when unset",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        template = load_template(settings.jobs.template_path)
    except (OSError, ValueError) as error:
        print(f"autoreduce-dispatcher: bad configuration: {error}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(settings)
    return run(settings=settings, kubeconfig=args.kubeconfig, template=template)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokerError as error:
        print(f"autoreduce-dispatcher: {error}", file=sys.stderr)
        sys.exit(EXIT_BROKER)
