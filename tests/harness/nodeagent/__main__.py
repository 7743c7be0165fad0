"""``python -m tests.harness.nodeagent --kubeconfig ... --node-name ... --port ...``

SIGTERM: stop and kill every container (teardown). SIGINT (or SIGKILL): stop and
leave containers running, as a kubelet restart does; a new agent adopts them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from tests.harness.nodeagent.agent import Agent, AgentConfig


def _taint(text: str) -> dict[str, str]:
    """``key=value:Effect`` or ``key:Effect``."""
    kv, effect = text.rsplit(":", 1)
    key, _, value = kv.partition("=")
    return (
        {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}
    )


def parse(argv: list[str]) -> AgentConfig:
    p = argparse.ArgumentParser(prog="nodeagent", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node-name", required=True)
    p.add_argument("--port", type=int, required=True, help="HTTPS port for /containerLogs")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--image-map", type=Path, required=True)
    p.add_argument("--tls-cert", type=Path, required=True)
    p.add_argument("--tls-key", type=Path, required=True)
    p.add_argument("--apiserver", required=True, help="host:port pods see as KUBERNETES_SERVICE_*")
    p.add_argument("--label", action="append", default=[], help="k=v node label")
    p.add_argument("--taint", action="append", default=[], help="key=value:Effect node taint")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first restart delay, s")
    p.add_argument("--backoff-max", type=float, default=30.0, help="restart delay cap, s")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    host, _, port = a.apiserver.rpartition(":")
    return AgentConfig(
        kubeconfig=a.kubeconfig, node_name=a.node_name, port=a.port, workdir=a.workdir,
        image_map=a.image_map, cert=a.tls_cert, key=a.tls_key, apiserver_host=host,
        apiserver_port=int(port), labels=dict(lbl.split("=", 1) for lbl in a.label),
        taints=[_taint(t) for t in a.taint], backoff_base_s=a.backoff_base,
        backoff_max_s=a.backoff_max,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    cfg = parse(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s"
    )
    agent = Agent(cfg)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        agent.shutdown(kill_pods=signum == signal.SIGTERM)
        logging.info("stopping on signal %d", signum)
        sys.stdout.flush()
        # The watch blocks in a socket read: leave from a thread that can exit the process.
        threading.Timer(0.3, lambda: __import__("os")._exit(0)).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.info("node agent %s starting: %s", cfg.node_name, json.dumps(str(cfg.workdir)))
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
