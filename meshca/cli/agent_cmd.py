"""``meshca agent``: the per-pod agent beside the workload, like istio-agent or SPIRE's
agent.

It gets the pod's X509-SVID from a meshca server with the pod's service-account token
(re-read from --token-file on every renewal), renews it at half-life with jitter, follows
the server's trust bundle, and serves both on a Unix socket to the workload:

  - the SPIFFE Workload API (FetchX509SVID, FetchX509Bundles; go-spiffe, py-spiffe,
    java-spiffe and spiffe-helper find it through SPIFFE_ENDPOINT_SOCKET=unix://<socket>);
  - Envoy SDS (secrets "default" and "ROOTCA", the names istio-agent uses);
  - gRPC health (service "" and "SpiffeWorkloadAPI": an SVID is held;
    "meshca.agent.Upstream": the server answered lately) and reflection.

When the server cannot be reached the agent keeps serving the last good SVID and says so
in its log and in health. At start, it serves the socket at once and waits for the
server (retrying with backoff); Workload API streams answer as soon as an SVID arrives.
A socket path that exists is replaced only when it is a stale socket (exit status 2 else).

Example:
  meshca agent --server meshca.meshca-system.svc:15012 --ca-file /etc/meshca/roots.pem \\
    --token-file /var/run/secrets/tokens/meshca --socket /run/spiffe/agent.sock
  export SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffe/agent.sock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_agent"]

log = logging.getLogger("meshca.agent")


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {value!r}")
    return mode


def add_agent_flags(parser: argparse.ArgumentParser, *, connection: bool = True) -> None:
    if connection:
        parser.add_argument("--server", required=True, help="the meshca server, HOST:PORT")
        parser.add_argument(
            "--token-file",
            required=True,
            help="the pod's projected service-account token; re-read on every renewal",
        )
        parser.add_argument(
            "--socket", required=True, help="the Unix socket to serve the workload on"
        )
        trust = parser.add_mutually_exclusive_group()
        trust.add_argument(
            "--ca-file",
            help="PEM roots that verify the server's TLS certificate (default: system roots)",
        )
        trust.add_argument(
            "--plaintext", action="store_true", help="the server runs --plaintext (tests only)"
        )
        parser.add_argument(
            "--server-name",
            help="the name to expect in the server's certificate (default: HOST of --server)",
        )
    parser.add_argument(
        "--out-dir",
        help="also write key.pem (0600), chain.pem and bundle.pem here, atomically, on change",
    )
    parser.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o600,
        help="permissions of the socket file, octal (default 0600: the agent's user only)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )


def run_agent(config: Any, log_level: str) -> int:
    """Run the agent until SIGTERM/SIGINT; 2 when the socket path cannot be used."""
    from meshca.adapters.agent.socket_path import SocketPathError
    from meshca.app import start_agent

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    async def main() -> int:
        try:
            agent = await start_agent(config)
        except SocketPathError as exc:
            print(f"meshca agent: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"meshca agent: {exc}", file=sys.stderr)
            return 2
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopped.set)
        waiter = asyncio.create_task(agent.wait())
        stopper = asyncio.create_task(stopped.wait())
        try:
            await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            crashed = waiter.done() and not stopper.done()
            stopper.cancel()
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            await agent.stop()
        if crashed:
            print("meshca agent: an internal loop failed; see the log above", file=sys.stderr)
            return 1
        log.info("meshca agent stopped")
        return 0

    return asyncio.run(main())


def _run(args: argparse.Namespace) -> int:
    from meshca.adapters.agent.runtime import AgentConfig

    server_name = args.server_name
    if server_name is None and not args.plaintext:
        server_name = args.server.rpartition(":")[0].strip("[]") or None
    config = AgentConfig(
        server=args.server,
        token_file=Path(args.token_file),
        socket=Path(args.socket).absolute(),
        ca_file=Path(args.ca_file) if args.ca_file else None,
        plaintext=args.plaintext,
        server_name=server_name,
        out_dir=Path(args.out_dir) if args.out_dir else None,
        socket_mode=args.socket_mode,
    )
    return run_agent(config, args.log_level)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "agent",
        help="the per-pod agent: SPIFFE Workload API and Envoy SDS on a Unix socket",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_agent_flags(parser)
    parser.set_defaults(run=_run)
