"""Helpers shared by the local node's parts: commands with timeouts, child processes, step timings.

Every command runs with a timeout; a failure raises :class:`NodeError` naming the step and ending
with the tail of the log that explains it. Child processes run in their own process group, die with
the process that started them (``PR_SET_PDEATHSIG``), and leave a PID file so that a later ``down``
can stop them even when the starter is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

from controlplane import die_with_parent, file_tail, text_tail

T = TypeVar("T")



class NodeError(RuntimeError):
    """A step of bringing the node up or down failed; the message names the step and ends with a log tail."""

    def __init__(self, step: str, message: str, log: Path | None = None, tail: str | None = None) -> None:
        self.step = step
        text = f"[{step}] {message}"
        if tail is None and log is not None:
            tail = file_tail(log)
        if tail:
            text += f"\n--- last lines of {log if log is not None else 'the output'} ---\n{tail}"
        super().__init__(text)


def say(message: str) -> None:
    print(f"[localnode] {message}", file=sys.stderr, flush=True)


def run(
    step: str,
    cmd: Sequence[str],
    *,
    timeout: float,
    log: Path | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd``; its output goes to ``log`` (appended) when given. Raise :class:`NodeError` on failure."""
    out: IO[bytes] | int = subprocess.PIPE
    handle: IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        handle.write(f"\n# {' '.join(cmd)}\n".encode())
        handle.flush()
        out = handle
    try:
        proc = subprocess.run(
            list(cmd),
            input=input,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
            timeout=timeout,
            env=env,
            cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        tail = file_tail(log) if log is not None else _decoded(exc.stdout) + _decoded(exc.stderr)
        raise NodeError(step, f"`{' '.join(cmd)}` did not finish within {timeout:.0f}s", log, tail) from None
    except FileNotFoundError as exc:
        raise NodeError(step, f"`{cmd[0]}` is not installed ({exc})") from None
    finally:
        if handle is not None:
            handle.close()
    if check and proc.returncode != 0:
        tail = file_tail(log) if log is not None else text_tail(_decoded(proc.stdout) + _decoded(proc.stderr))
        raise NodeError(step, f"`{' '.join(cmd)}` exited with {proc.returncode}", log, tail)
    return proc


def _decoded(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def wait_until(
    step: str,
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 1.0,
    log: Path | None = None,
    alive: Callable[[], tuple[str, Path] | None] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy.

    Fail after ``timeout`` s, or as soon as ``alive`` names a component that died (with that component's log).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                message, dead_log = dead
                raise NodeError(step, f"{message} while waiting for {what}", dead_log)
        try:
            result = check()
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            result, last = None, exc
        else:
            last = result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise NodeError(step, f"{what}: not within {timeout:.0f}s (last: {last!r})", log)
        time.sleep(interval)


# -- processes ---------------------------------------------------------------------------------


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


class Child:
    """One long-running component: its own process group, output to a log, a PID file for ``down``."""

    def __init__(self, name: str, log: Path, pid_dir: Path) -> None:
        self.name = name
        self.log = log
        self.pid_file = pid_dir / f"{name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"# {' '.join(cmd)}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=die_with_parent(os.getpid()),
                )
            except OSError as exc:
                raise NodeError(self.name, f"cannot start {cmd[0]}: {exc}", self.log) from exc
        self.pid_file.write_text(json.dumps({"pid": self.proc.pid, "start": start_time(self.proc.pid)}))

    def dead(self) -> str | None:
        """Why the process is not running, or None while it runs."""
        if self.proc is None:
            return f"{self.name} was not started"
        code = self.proc.poll()
        return None if code is None else f"{self.name} exited with code {code}"

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc.pid, timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.pid_file.unlink(missing_ok=True)


def stop_group(pid: int, timeout: float = 20.0, sig: int = signal.SIGTERM) -> None:
    """``sig`` to the process group led by ``pid``, SIGKILL after ``timeout`` s; then SIGKILL to what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie child is reaped by its Popen; one of ours re-parented goes to init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_from_pid_file(pid_file: Path, timeout: float = 20.0) -> str | None:
    """Stop the process group a PID file names, if that very process (same start time) still runs."""
    try:
        doc = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    pid = int(doc["pid"])
    stopped = None
    if start_time(pid) is not None and start_time(pid) == doc.get("start"):
        stop_group(pid, timeout)
        stopped = f"{pid_file.stem} (pid {pid})"
    pid_file.unlink(missing_ok=True)
    return stopped


# -- timings -----------------------------------------------------------------------------------


class Timings:
    """How long each stage took, in order; kept in a JSON file so that several processes can add to it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.stages: list[tuple[str, float]] = []

    @classmethod
    def read(cls, path: Path) -> Timings:
        """The stages another process wrote to ``path`` (for display)."""
        timings = cls()
        with contextlib.suppress(OSError, ValueError):
            timings.stages = [(str(n), float(s)) for n, s in json.loads(path.read_text())]
        return timings

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        say(f"{name} ...")
        try:
            yield
        finally:
            seconds = time.monotonic() - began
            self.add(name, seconds)
            say(f"{name}: {seconds:.1f}s")

    def add(self, name: str, seconds: float) -> None:
        """Record a stage; a stage that ran before (e.g. packages, checked twice) adds to its first row."""
        for i, (known, before) in enumerate(self.stages):
            if known == name:
                self.stages[i] = (name, before + seconds)
                break
        else:
            self.stages.append((name, seconds))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.stages))

    def table(self) -> str:
        width = max((len(n) for n, _ in self.stages), default=5)
        lines = [f"  {name:<{width}}  {seconds:7.1f}s" for name, seconds in self.stages]
        total = sum(s for _, s in self.stages)
        lines.append(f"  {'total':<{width}}  {total:7.1f}s")
        return "\n".join(lines)
