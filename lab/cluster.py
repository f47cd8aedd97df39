"""Node agents in the lab: one per lab host, each in its host's namespace with its
own state directory, reached only over the lab's addresses.

A :class:`LabCluster` owns the agents it starts (each in its own process group,
with ``PR_SET_PDEATHSIG``) and stops them in ``close``/``__exit__`` — SIGTERM, then
SIGKILL after a deadline. State directories live under the ``root`` it is given
(a test's tmp dir). ``livemig`` commands run in a host's namespace through
:meth:`LabCluster.cli`. Agents listen on the hosts' migration-link addresses
(``198.19.0.1`` and ``.2``), the only addresses host A and host B share.

``python -m lab.cluster request URL [--cert PEM --key PEM]`` makes one HTTPS request
without verifying the server and prints ``{"status": N, "body": ...}`` or
``{"error": ...}``: the integration test uses it as a client that holds no cluster
certificate, or one from another CA.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lab.errors import LabError
from lab.net import Lab, LabHost

#: The agents' port on the lab addresses.
AGENT_PORT = 7443
_PR_SET_PDEATHSIG = 1
_ROOT = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _env() -> dict[str, str]:
    path = [str(_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


@dataclass
class AgentProcess:
    host: LabHost
    process: subprocess.Popen[bytes]
    stderr_path: Path


class LabCluster:
    """Agents on a :class:`Lab`'s hosts; a context manager that stops them on exit."""

    def __init__(self, lab: Lab, root: Path, port: int = AGENT_PORT) -> None:
        self.lab = lab
        self.root = root
        self.port = port
        self._agents: dict[str, AgentProcess] = {}

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- where things are ------------------------------------------------------------

    def state_dir(self, host: LabHost, name: str | None = None) -> Path:
        """``root/<name or host name>``: a host may hold more than one (a node that fails to join)."""
        return self.root / (name or host.name)

    def address(self, host: LabHost) -> str:
        return f"{host.migration_addr}:{self.port}"

    # -- commands --------------------------------------------------------------------

    def cli(
        self, host: LabHost, *args: str, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``livemig ARGS`` in ``host``'s namespace; the finished process (not checked)."""
        argv = self.lab.netns_argv(host.netns, [sys.executable, "-m", "migrate.cli", *args])
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, env=_env(), timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"`livemig {' '.join(args)}` on host {host.name} took over {timeout_s} s"
            ) from exc

    def python(
        self, host: LabHost, *args: str, timeout_s: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``python ARGS`` in ``host``'s namespace (e.g. ``-m lab.cluster request ...``)."""
        argv = self.lab.netns_argv(host.netns, [sys.executable, *args])
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, env=_env(), timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(
                f"`python {' '.join(args)}` on host {host.name} took over {timeout_s} s"
            ) from exc

    # -- agents ----------------------------------------------------------------------

    def start_agent(self, host: LabHost, timeout_s: float = 20.0) -> AgentProcess:
        """Start ``livemig agent`` for ``host``'s state directory; return once it listens.

        Raises :class:`LabError` (with its output) if it exits or does not listen in time.
        """
        if host.name in self._agents:
            raise LabError(f"host {host.name} already runs an agent")
        state = self.state_dir(host)
        log = state / "agent.log"
        offset = log.stat().st_size if log.exists() else 0
        stderr_path = self.root / f"agent-{host.name}.stderr"
        argv = self.lab.netns_argv(
            host.netns, [sys.executable, "-m", "migrate.cli", "agent", "--state-dir", str(state)]
        )
        with stderr_path.open("ab") as err:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=_env(),
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        agent = AgentProcess(host, process, stderr_path)
        self._agents[host.name] = agent
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._agents.pop(host.name, None)
                raise LabError(
                    f"agent on host {host.name} exited ({process.returncode}): "
                    + stderr_path.read_text(errors="replace")[-2000:]
                )
            if log.exists():
                with log.open("rb") as f:
                    f.seek(offset)
                    if b"listening on" in f.read():
                        return agent
            time.sleep(0.05)
        self.stop_agent(host)
        raise LabError(f"agent on host {host.name} did not listen within {timeout_s} s")

    def stop_agent(self, host: LabHost, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the agent's process group, SIGKILL after ``timeout_s``; its exit code."""
        agent = self._agents.pop(host.name, None)
        if agent is None:
            return None
        process = agent.process
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                return process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        """Stop every agent this cluster started. Idempotent."""
        for name in list(self._agents):
            self.stop_agent(self._agents[name].host)


# -- a client without a cluster certificate -----------------------------------------------


async def _request(
    url: str, cert: Path | None, key: Path | None, timeout_s: float
) -> dict[str, object]:
    import aiohttp

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url, ssl=ctx) as resp,
        ):
            text = await resp.text()
            try:
                body: object = json.loads(text)
            except ValueError:
                body = text
            return {"status": resp.status, "body": body}
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.cluster")
    sub = parser.add_subparsers(dest="action", required=True)
    req = sub.add_parser("request", help="one unverified HTTPS GET; prints JSON")
    req.add_argument("url")
    req.add_argument("--cert", type=Path, default=None)
    req.add_argument("--key", type=Path, default=None)
    req.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(_request(args.url, args.cert, args.key, args.timeout))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
