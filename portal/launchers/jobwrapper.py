"""Runs one job command and records its exit code in the run folder.

Started by the local launcher as the leader of a new session/process group, so that cancel can
signal the whole group, and so that a portal restarted meanwhile still learns how the job
ended (it cannot wait() for a process it did not start). Standard library only: it must start
fast and never import the portal.

usage: python -m portal.launchers.jobwrapper EXIT_CODE_FILE -- COMMAND...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: jobwrapper EXIT_CODE_FILE -- COMMAND...", file=sys.stderr)
        return 2
    exit_file, command = argv[0], argv[2:]
    try:
        child = subprocess.Popen(command)  # same process group: a group signal reaches it too
    except OSError as err:
        print(f"cannot start {command[0]}: {err}", file=sys.stderr, flush=True)
        _record(exit_file, 127)
        return 127

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    _record(exit_file, code)
    return code if code >= 0 else 128 - code


def _record(exit_file: str, code: int) -> None:
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(code))
    os.replace(tmp, exit_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
