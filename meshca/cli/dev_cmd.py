"""``meshca dev``: a self-contained local CA with its own Kubernetes-style token issuer.

``dev serve`` runs the real server in jwks mode against a token issuer kept in the data
directory, so ``dev token`` and ``dev request`` can act as a proxy would: mint a
service-account token, make a key and CSR, and ask for a certificate over TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from meshca.adapters.grpc.client import channel_to, create_certificate
from meshca.adapters.k8s.dev_issuer import DevTokenIssuer
from meshca.adapters.keys.file_store import write_private
from meshca.cli.ca_cmd import load_bundle
from meshca.cli.serve_cmd import add_setting_flags, settings_from
from meshca.config import Settings

__all__ = ["register"]

DEV_DATA_DIR = "meshca-dev"
DEV_LISTEN = "127.0.0.1:15012"
DEV_AUDIENCE = "meshca"
DEV_TOKEN_FILE = Path("policy-token")


def _issuer(data_dir: Path) -> DevTokenIssuer:
    return DevTokenIssuer(data_dir / "dev-issuer")


def dev_settings(args: argparse.Namespace) -> Settings:
    data_dir = Path(args.data_dir or DEV_DATA_DIR)
    issuer = _issuer(data_dir)
    base = Settings(
        listen=DEV_LISTEN,
        data_dir=data_dir,
        k8s_mode="jwks",
        k8s_issuer=issuer.issuer,
        k8s_jwks_file=issuer.jwks_path,
        k8s_audience=(DEV_AUDIENCE,),
        workers=1,
    )
    settings = settings_from(args, base=base)
    if settings.policy_dir is not None and settings.policy_listen is None:
        # A dev server listens on loopback for one person trying meshca out: ext_authz on
        # the port they already use, as before (the log warns); the policy API still
        # takes a token, which dev serve makes (see ``ensure_policy_token``).
        settings = replace(
            settings,
            policy_insecure_main_port=True,
            policy_token_file=settings.policy_token_file or settings.data_dir / DEV_TOKEN_FILE,
        )
    return settings


def ensure_policy_token(settings: Settings) -> None:
    """Write a random policy token to the dev data directory, once."""
    path = settings.data_dir / DEV_TOKEN_FILE
    if settings.policy_token_file == path and not path.exists():
        write_private(path, secrets.token_urlsafe(32).encode() + b"\n")


def _make_key_and_csr() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def request_certificate(
    *,
    data_dir: Path,
    target: str,
    namespace: str,
    service_account: str,
    plaintext: bool,
    out_dir: Path | None,
    ttl_seconds: int = 0,
) -> int:
    """Act as a proxy: token + key + CSR -> Istio CreateCertificate -> verified chain."""
    token = _issuer(data_dir).mint(namespace, service_account, DEV_AUDIENCE, now=datetime.now(UTC))
    key_pem, csr_pem = _make_key_and_csr()
    roots = load_bundle(data_dir)
    roots_pem = b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)
    with channel_to(target, None if plaintext else roots_pem) as channel:
        try:
            chain_pem = create_certificate(channel, token, csr_pem, ttl_seconds)
        except grpc.RpcError as exc:
            print(f"meshca: request refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pem]
    leaf = chain[0]
    verifier = PolicyBuilder().store(Store(list(roots))).build_client_verifier()
    verified = verifier.verify(leaf, chain[1:-1])
    spiffe_id = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    print(f"Issued an X.509 SVID over Istio's CreateCertificate API ({target}):")
    print(f"  SPIFFE ID   {spiffe_id.get_values_for_type(x509.UniformResourceIdentifier)[0]}")
    print(f"  serial      {leaf.serial_number:x}")
    print(
        f"  valid       {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ} .. "
        f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
    )
    print(
        f"  chain       {len(chain)} certificates, verified to the trust bundle "
        f"({len(verified.chain)} in the verified path)"
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_private(out_dir / "key.pem", key_pem)
        (out_dir / "chain.pem").write_text("".join(chain_pem))
        print(f"  wrote       {out_dir / 'key.pem'} and {out_dir / 'chain.pem'}")
    else:
        print(chain_pem[0], end="")
    return 0


async def _serve_with_demo(settings: Settings, demo: bool) -> None:
    from meshca import app

    worker = await app.start_worker(settings)
    host = settings.listen.rpartition(":")[0]
    target = f"{host}:{worker.port}"
    print(
        f"meshca dev CA serving on {target} "
        f"({'plaintext' if settings.plaintext else 'TLS'}), data in {settings.data_dir}/",
        flush=True,
    )
    if worker.policy_port is not None:
        print(
            f"ext_authz and the policy API on {host}:{worker.policy_port} (mTLS: present an "
            "SVID, e.g. from 'meshca dev request --out-dir')",
            flush=True,
        )
    elif worker.authz is not None:
        print(
            f"ext_authz on {target} too, open to anyone who can reach it (dev keeps it on "
            "its own port; --policy-listen HOST:PORT requires client SVIDs); the policy API "
            f"takes the token in {settings.policy_token_file}",
            flush=True,
        )
    if demo:
        await asyncio.to_thread(
            request_certificate,
            data_dir=settings.data_dir,
            target=target,
            namespace="default",
            service_account="demo",
            plaintext=settings.plaintext,
            out_dir=None,
        )
    print(
        "\nTry, in another terminal:\n"
        f"  meshca dev request --data-dir {settings.data_dir} --namespace shop "
        "--service-account cart\n"
        f"  meshca audit list --data-dir {settings.data_dir}\n"
        f"  meshca ca bundle --data-dir {settings.data_dir}\n"
        + (
            f"  meshca ca bundle --data-dir {settings.data_dir} > roots.pem && "
            f"meshca policy status --server {target} "
            f"{'--plaintext' if settings.plaintext else '--ca-file roots.pem'} "
            f"--token-file {settings.policy_token_file}\n"
            if worker.authz is not None
            and settings.policy_insecure_main_port
            and settings.policy_token_file is not None
            else ""
        )
        + "Stop with Ctrl-C.",
        flush=True,
    )
    await app.serve_until_stopped(worker, settings.shutdown_grace, supervised=False)


def _serve(args: argparse.Namespace) -> int:
    from meshca import app
    from meshca.adapters.shutdown import exit_now

    settings = dev_settings(args)
    _issuer(settings.data_dir).ensure()
    app.configure_logging(replace(settings, log_level="warning"))
    logging.getLogger("meshca").setLevel(settings.log_level.upper())
    app.prepare(settings)
    ensure_policy_token(settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_with_demo(settings, args.demo))
    exit_now(0)


def _token(args: argparse.Namespace) -> int:
    issuer = _issuer(Path(args.data_dir))
    issuer.ensure()
    print(
        issuer.mint(
            args.namespace,
            args.service_account,
            args.audience,
            ttl=timedelta(seconds=args.ttl),
            now=datetime.now(UTC),
        )
    )
    return 0


def _request(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if not load_bundle(data_dir):
        print(f"meshca: no dev CA in {data_dir}: run 'meshca dev serve' first", file=sys.stderr)
        return 1
    return request_certificate(
        data_dir=data_dir,
        target=args.server,
        namespace=args.namespace,
        service_account=args.service_account,
        plaintext=args.plaintext,
        out_dir=Path(args.out_dir) if args.out_dir else None,
        ttl_seconds=args.ttl,
    )


def _agent(args: argparse.Namespace) -> int:
    from meshca.adapters.agent.runtime import AgentConfig
    from meshca.cli.agent_cmd import run_agent

    data_dir = Path(args.data_dir).absolute()
    roots = load_bundle(data_dir)
    if not roots:
        print(f"meshca: no dev CA in {data_dir}: run 'meshca dev serve' first", file=sys.stderr)
        return 1
    agent_dir = data_dir / "agent"
    agent_dir.mkdir(parents=True, exist_ok=True)
    ca_file = agent_dir / "ca.pem"
    ca_file.write_bytes(b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots))
    token_file = agent_dir / "token"
    issuer = _issuer(data_dir)
    token = issuer.mint(
        args.namespace,
        args.service_account,
        DEV_AUDIENCE,
        ttl=timedelta(hours=24),
        now=datetime.now(UTC),
    )
    write_private(token_file, token.encode())
    socket = Path(args.socket).absolute() if args.socket else agent_dir / "socket"
    print(
        f"meshca dev agent for spiffe://.../ns/{args.namespace}/sa/{args.service_account} "
        f"against {args.server}\n"
        f"  socket  unix://{socket}\n"
        f"  token   {token_file} (a dev token valid for 24h)\n"
        "In another terminal:\n"
        f"  export SPIFFE_ENDPOINT_SOCKET=unix://{socket}\n"
        "Stop with Ctrl-C.",
        flush=True,
    )
    config = AgentConfig(
        server=args.server,
        token_file=token_file,
        socket=socket,
        ca_file=None if args.plaintext else ca_file,
        plaintext=args.plaintext,
        server_name=None if args.plaintext else "localhost",
        out_dir=Path(args.out_dir) if args.out_dir else None,
        socket_mode=args.socket_mode,
    )
    return run_agent(config, args.log_level)


def _identity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DEV_DATA_DIR, help="dev data directory")
    parser.add_argument("--namespace", default="default", help="namespace in the token")
    parser.add_argument("--service-account", default="demo", help="service account in the token")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "dev",
        help="a local CA with a built-in token issuer, for trying meshca out",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dev_command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="run meshca with a dev token issuer (127.0.0.1:15012, TLS)",
        description="Run the real server in jwks mode against a local token issuer.",
    )
    add_setting_flags(serve, skip=("data_dir",))
    serve.add_argument("--data-dir", default=None, help=f"default ./{DEV_DATA_DIR}")
    serve.add_argument(
        "--demo", action="store_true", help="issue one certificate at start-up and print it"
    )
    serve.set_defaults(run=_serve)

    token = sub.add_parser("token", help="print a service-account token from the dev issuer")
    _identity_flags(token)
    token.add_argument("--audience", default=DEV_AUDIENCE)
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.set_defaults(run=_token)

    request = sub.add_parser(
        "request",
        help="act as a proxy: get a certificate from a running dev server",
    )
    _identity_flags(request)
    request.add_argument("--server", default=DEV_LISTEN, help=f"HOST:PORT (default {DEV_LISTEN})")
    request.add_argument("--plaintext", action="store_true", help="the server runs --plaintext")
    request.add_argument("--out-dir", help="write key.pem and chain.pem here")
    request.add_argument("--ttl", type=int, default=0, help="requested lifetime in seconds")
    request.set_defaults(run=_request)

    from meshca.cli.agent_cmd import add_agent_flags

    agent = sub.add_parser(
        "agent",
        help="run `meshca agent` against the dev server with a dev token",
        description=(
            "Start `meshca agent` against a running `meshca dev serve`: a dev token from "
            "its issuer, its roots as the CA file, the socket at <data-dir>/agent/socket."
        ),
    )
    _identity_flags(agent)
    agent.add_argument("--server", default=DEV_LISTEN, help=f"HOST:PORT (default {DEV_LISTEN})")
    agent.add_argument("--plaintext", action="store_true", help="the server runs --plaintext")
    agent.add_argument("--socket", help="default <data-dir>/agent/socket")
    add_agent_flags(agent, connection=False)
    agent.set_defaults(run=_agent)
