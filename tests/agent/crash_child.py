"""Child process of ``test_crash``: install a bundle (or roll back) and SIGKILL itself at the
Nth store checkpoint.

    python crash_child.py HOME (BUNDLE | rollback) KILL_AT NOW

``KILL_AT`` 0 never kills; the process then prints the checkpoint labels it saw, as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentConfig


def main(argv: list[str]) -> int:
    home, action, kill_at, now = Path(argv[1]), argv[2], int(argv[3]), int(argv[4])
    labels: list[str] = []

    def checkpoint(label: str) -> None:
        labels.append(label)
        if len(labels) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    agent = Agent(AgentConfig.load(home), clock=lambda: now, checkpoint=checkpoint)
    if action == "rollback":
        agent.rollback()
    else:
        agent.install_file(Path(action))
    print(json.dumps(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
