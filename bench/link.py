"""The bench's link proxy in a process of its own (``python -m bench.link``).

The tests' fault proxy is Python: run inside the bench's process it relays every
byte on threads that share one GIL with the agent being measured, while s5cmd, a
process of its own, has the proxy's process to itself. On two busy cores that
made the agent's office-link figures a measure of the proxy (a 1,000-file cold
open 1.43 x s5cmd in-process, 1.02-1.05 x with the proxy in its own process,
2026-12-06). Here the proxy runs in a child process; the parent asks it for the
number of requests it relayed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import IO

from tests.faultproxy import FaultProxy, LinkProfile

ROOT = Path(__file__).resolve().parents[1]


class LinkProxy:
    """A ``FaultProxy`` with ``profile`` in front of ``upstream``, in a child process."""

    def __init__(self, upstream: str, profile: LinkProfile) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.link", upstream, json.dumps(dataclasses.asdict(profile))],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.endpoint = self._ask(None)

    def _ask(self, command: str | None) -> str:
        stdin: IO[str] | None = self._proc.stdin
        stdout: IO[str] | None = self._proc.stdout
        assert stdin is not None and stdout is not None
        if command is not None:
            stdin.write(command + "\n")
            stdin.flush()
        line = stdout.readline().strip()
        if not line:
            raise RuntimeError("the link proxy process ended")
        return line

    def requests(self) -> int:
        """How many requests the proxy relayed so far."""
        return int(self._ask("count"))

    def stop(self) -> None:
        """End the proxy process."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=30)

    def __enter__(self) -> LinkProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def main() -> None:
    """The child: serve until stdin closes; answer ``count`` with the requests seen."""
    upstream, profile = sys.argv[1], LinkProfile(**json.loads(sys.argv[2]))
    with FaultProxy(upstream) as proxy:
        proxy.link_profile(profile)
        print(proxy.endpoint, flush=True)
        for line in sys.stdin:
            if line.strip() == "count":
                print(len(proxy.seen), flush=True)


if __name__ == "__main__":
    main()
