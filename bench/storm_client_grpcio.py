"""A storm load generator on grpcio's client (compared in STORM.md; the default is C).

One ``grpc.aio`` channel per proxy, each with its own subchannel (no sharing of
connections between channels), TLS against the trust bundle, one unary call with the
proxy's ``authorization`` metadata. Same flags, protocol and results file as
storm_client.c. grpc does not expose connect and handshake times, so only the start and
end of each proxy are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import grpc

from storm_workload import ProxyOutcome, run_client

METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


async def storm(
    args: argparse.Namespace, requests: list[tuple[bytes, bytes]], outcomes: list[ProxyOutcome]
) -> None:
    credentials = grpc.ssl_channel_credentials(args.ca.read_bytes())
    options = [
        ("grpc.ssl_target_name_override", args.server_name),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),
    ]
    target = f"{args.host}:{args.port}"
    limit = asyncio.Semaphore(args.max_inflight)

    async def proxy(request: tuple[bytes, bytes], outcome: ProxyOutcome) -> None:
        authorization, body = request
        async with limit:
            outcome.start_ns = time.monotonic_ns()
            async with grpc.aio.secure_channel(target, credentials, options) as channel:
                call = channel.unary_unary(METHOD)  # bytes in, bytes out
                try:
                    reply = await call(
                        body[5:], metadata=(("authorization", authorization.decode()),)
                    )
                except grpc.aio.AioRpcError as exc:
                    outcome.end_ns = time.monotonic_ns()
                    outcome.grpc_status = exc.code().value[0]
                    outcome.http_status = 200
                    outcome.error_text = exc.details() or ""
                    return
                outcome.end_ns = time.monotonic_ns()
                outcome.grpc_status = 0
                outcome.http_status = 200
                outcome.body = b"\x00" + len(reply).to_bytes(4, "big") + reply

    await asyncio.gather(*(proxy(r, o) for r, o in zip(requests, outcomes, strict=True)))


if __name__ == "__main__":
    run_client(storm)
