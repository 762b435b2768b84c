"""Start and stop `qtllava serve` / `qtllava client` as real processes on this machine (demo, benchmark, tests).

Servers listen on 127.0.0.1 port 0 and report the port they got through a port file, so nothing races for a
"free" port. Every wait is bounded; `stop` escalates from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["SplitProcess", "spawn", "spawn_server", "qtllava_command"]


def qtllava_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qtllava.cli", *args]


class SplitProcess:
    """A child process whose stdout and stderr go to `log`."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.args = args
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("ab")
        self.popen = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        """Exit status; raises TimeoutError (the process keeps running) if it does not end in `timeout` s."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.args[3:5]} still running after {timeout:.0f} s; log: {self.log}") from None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def kill9(self) -> None:
        """SIGKILL and reap: a crash with no chance to clean up."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps and closes the log."""
        try:
            if self.alive():
                self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                self.signal(signal.SIGTERM)
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(10)
            return self.popen.returncode
        finally:
            self._log_file.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(args: list[str], log: Path, env: dict | None = None) -> SplitProcess:
    """Run `qtllava <args>` as a child process."""
    return SplitProcess(qtllava_command(*args), log, env)


def spawn_server(args: list[str], port_file: Path, log: Path, timeout: float = 120.0, env: dict | None = None,
                 listen: str = "127.0.0.1:0") -> tuple[SplitProcess, int]:
    """Run `qtllava serve <args> --listen LISTEN --port-file F`; wait until it listens. -> (process, port)

    The default port 0 lets the kernel pick a free port; a restarted server passes the port it had."""
    port_file = Path(port_file)
    if port_file.exists():
        port_file.unlink()
    proc = spawn(["serve", *args, "--listen", listen, "--port-file", str(port_file)], log, env)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if not proc.alive():
            proc.stop()
            raise RuntimeError(f"server exited with status {proc.popen.returncode}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"server did not listen within {timeout:.0f} s:\n{proc.tail()}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())
