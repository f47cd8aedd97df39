"""The engine's side of an agent: start it (in a namespace), talk JSON lines, reap it.

:class:`AgentProcess` is an async context manager owning one
``python -m migrate.pagestream.agent`` process. The agent gets
``PR_SET_PDEATHSIG=SIGKILL`` and its own process group, so it dies with the
engine's thread even on SIGKILL; :meth:`AgentProcess.close` ends it softly (end
of stdin), then with SIGTERM, then SIGKILL, and always reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import itertools
import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from migrate.deadline import within
from migrate.errors import ConfigError, StreamError

#: The module an agent runs as (``python -m``), unless told otherwise.
AGENT_MODULE: Final = "migrate.pagestream.agent"
_PR_SET_PDEATHSIG: Final = 1
_STDERR_TAIL_LINES: Final = 30
# A stream's control lines are small, but a scan result or error may carry lists.
_LINE_LIMIT: Final = 16 << 20


class AgentRole(enum.StrEnum):
    SENDER = "sender"
    RECEIVER = "receiver"


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def agent_argv(
    role: AgentRole,
    netns: str | None,
    python: str = sys.executable,
    module: str = AGENT_MODULE,
) -> list[str]:
    """The command line of an agent, wrapped in ``ip netns exec`` when ``netns`` is set."""
    argv = [python, "-m", module, "--role", role.value]
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class AgentChannel:
    """The JSON-lines control protocol of one agent, whatever carries the lines.

    :meth:`call` sends a command and waits for its reply (raising the agent's
    error as :class:`StreamError` or :class:`ConfigError`); :meth:`wait_event`
    waits for an unsolicited event, raising if the agent reports ``failed`` or
    ends first. A carrier (:class:`AgentProcess`: a child process's stdin and
    stdout; a node agent's websocket relay) implements :meth:`start`,
    :meth:`close` and :meth:`_send`, hands each line it receives to
    :meth:`_receive` and calls :meth:`_ended` once, when the agent is gone.
    """

    def __init__(self, role: AgentRole) -> None:
        self.role = role
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()
        self._exit_error: StreamError | None = None
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start (or reach) the agent. Raises :class:`StreamError` if it cannot."""
        raise NotImplementedError

    async def close(self, timeout: float = 5.0) -> None:
        """End the agent; it is gone (reaped) when this returns."""
        raise NotImplementedError

    async def _send(self, line: str) -> None:
        """Send one line (with its newline); raises ``ConnectionResetError`` /
        ``BrokenPipeError`` when the carrier is gone."""
        raise NotImplementedError

    # --- talking ------------------------------------------------------------------------

    async def call(
        self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Run ``command`` on the agent; its result. ``timeout`` in seconds (None: none).

        Raises :class:`StreamError` / :class:`ConfigError` as the agent reported
        them, or :class:`StreamError` (kind ``agent``) if it exits or times out.
        """
        if not self._started:
            raise StreamError(f"the {self.role} agent was not started", side=self.role.value)
        if self._exit_error is not None:
            raise self._exit_error
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        line = json.dumps({"id": request_id, "cmd": command, "args": args or {}}) + "\n"
        try:
            await self._send(line)
            return await within(future, timeout)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise self._exit_error or StreamError(
                f"the {self.role} agent is gone: {exc}", side=self.role.value, kind="agent"
            ) from exc
        except TimeoutError:
            raise StreamError(
                f"the {self.role} agent did not answer {command!r} within {timeout:g} s",
                side=self.role.value,
                kind="agent",
            ) from None
        finally:
            self._pending.pop(request_id, None)

    def find_event(self, name: str, since: int = 0) -> dict[str, Any] | None:
        for event in self.events[since:]:
            if event.get("event") == name:
                return event
        return None

    @property
    def failure(self) -> StreamError | ConfigError | None:
        """The error of a ``failed`` event, or of the agent's exit, if any."""
        failed = self.find_event("failed")
        if failed is not None:
            return self._rebuild(failed.get("error") or {})
        return self._exit_error

    async def wait_failure(self, timeout: float) -> StreamError | ConfigError | None:
        """The agent's failure once it reports one or exits; None if neither within
        ``timeout`` s (used to name the cause when the peer saw a broken stream)."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while (failure := self.failure) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await within(self._changed.wait(), remaining)
            return failure

    async def wait_event(self, name: str, timeout: float, since: int = 0) -> dict[str, Any]:
        """The first ``name`` event at index >= ``since``, waiting up to ``timeout`` s.

        Raises the agent's error if it reported ``failed`` or exited first, and
        :class:`StreamError` on timeout.
        """
        deadline = time.monotonic() + timeout
        async with self._changed:
            while (event := self.find_event(name, since)) is None:
                if (failure := self.failure) is not None:
                    raise failure
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamError(
                        f"the {self.role} agent sent no {name!r} within {timeout:g} s",
                        side=self.role.value,
                        kind="agent",
                    )
                with contextlib.suppress(TimeoutError):
                    await within(self._changed.wait(), remaining)
            return event

    # --- receiving ----------------------------------------------------------------------

    async def _receive(self, message: dict[str, Any]) -> None:
        """One line from the agent: an event, or the reply to a pending call."""
        if "event" in message:
            self.events.append(message)
            async with self._changed:
                self._changed.notify_all()
            return
        future = self._pending.get(message.get("id"))  # type: ignore[arg-type]
        if future is None or future.done():
            return
        if message.get("ok"):
            future.set_result(dict(message.get("result") or {}))
        else:
            future.set_exception(self._rebuild(message.get("error") or {}))

    async def _ended(self, error: StreamError) -> None:
        """The agent is gone: ``error`` answers every pending and later call."""
        self._exit_error = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        async with self._changed:
            self._changed.notify_all()

    def _rebuild(self, error: dict[str, Any]) -> StreamError | ConfigError:
        message = str(error.get("message", "unknown agent error"))
        if error.get("type") == "ConfigError":
            return ConfigError(f"{self.role}: {message}")
        return StreamError(
            message,
            side=str(error.get("side") or self.role.value),
            kind=str(error.get("kind") or "agent"),
            detail=error.get("detail"),
        )


class AgentProcess(AgentChannel):
    """One agent process (this host, or ``netns``) and its control channel.

    ``log_path`` keeps the agent's stderr (else only its tail is kept, for error
    messages). ``module`` is what runs as the agent (``python -m``).
    """

    def __init__(
        self,
        role: AgentRole,
        netns: str | None = None,
        log_path: Path | None = None,
        module: str = AGENT_MODULE,
    ):
        super().__init__(role)
        self.netns = netns
        self.log_path = log_path
        self.argv = agent_argv(role, netns, module=module)
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr_tail)

    async def start(self) -> None:
        """Start the agent. Raises :class:`StreamError` if it cannot be started."""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            raise StreamError(
                f"cannot start the {self.role} agent ({' '.join(self.argv)}): {exc}",
                side=self.role.value,
                kind="agent",
            ) from exc
        self._started = True
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._tasks = [
            asyncio.create_task(self._read_stdout(self._proc.stdout), name=f"{self.role} agent"),
            asyncio.create_task(self._read_stderr(self._proc.stderr), name=f"{self.role} log"),
        ]

    async def _send(self, line: str) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.write(line.encode())
        await proc.stdin.drain()

    async def send_raw(self, line: str) -> None:
        """Send a line as it is (a relay passing on its client's commands)."""
        await self._send(line)

    # --- reading ------------------------------------------------------------------------

    async def _read_stdout(self, stdout: asyncio.StreamReader) -> None:
        try:
            while line := await stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    self._stderr_tail.append(f"(stdout) {line.decode(errors='replace').rstrip()}")
                    continue
                if isinstance(message, dict):
                    await self._on_line(line, message)
        finally:
            await self._on_exit()

    async def _on_line(self, line: bytes, message: dict[str, Any]) -> None:
        """One JSON line of the agent's stdout (a relay overrides it to pass it on)."""
        await self._receive(message)

    async def _on_exit(self) -> None:
        code = await self._proc.wait() if self._proc is not None else None
        # Let the stderr reader catch up so the message carries the agent's last words.
        with contextlib.suppress(TimeoutError):
            await within(asyncio.shield(self._tasks[1]), 1.0)
        tail = " | ".join(list(self._stderr_tail)[-5:])
        await self._ended(
            StreamError(
                f"the {self.role} agent exited with code {code}" + (f": {tail}" if tail else ""),
                side=self.role.value,
                kind="agent",
                detail={"exit_code": code, "stderr": list(self._stderr_tail)},
            )
        )

    async def _read_stderr(self, stderr: asyncio.StreamReader) -> None:
        log = self.log_path.open("a", encoding="utf-8") if self.log_path else None
        try:
            while line := await stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self._stderr_tail.append(text)
                if log is not None:
                    log.write(text + "\n")
                    log.flush()
        finally:
            if log is not None:
                log.close()

    # --- ending -------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """End the agent: end of stdin, then SIGTERM, then SIGKILL; always reaped."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.close()
                with contextlib.suppress(TimeoutError):
                    await within(proc.wait(), timeout)
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                if proc.returncode is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(TimeoutError):
                    await within(proc.wait(), wait)
        finally:
            for task in self._tasks:
                if not task.done():
                    with contextlib.suppress(TimeoutError):
                        await within(asyncio.shield(task), 2.0)
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
