"""How a command fails: the exit codes and the one error a command raises.

Exit codes: 0 done (a followed run ended Complete or Skipped), 1 the followed run
ended in error, 2 bad usage or settings, 3 broker unreachable, 4 API error,
5 timed out waiting, 6 not found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from autoreduce_common.stomp_client import BrokerError

from dispatcher.kube import KubeError

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_BROKER, EXIT_API, EXIT_TIMEOUT, EXIT_NOT_FOUND = range(7)


class CliError(Exception):
    """A failure told in one line, with the exit code it ends the command with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def mapped_errors() -> Iterator[None]:
    """The broker's and the API's errors as CliErrors, so each gets its own exit code."""
    try:
        yield
    except BrokerError as error:
        raise CliError(f"broker: {error}", EXIT_BROKER) from error
    except KubeError as error:
        raise CliError(f"Kubernetes API: {error}", EXIT_API) from error
