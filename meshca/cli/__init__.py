"""The ``meshca`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meshca.cli import (
    agent_cmd,
    audit_cmd,
    ca_cmd,
    db_cmd,
    dev_cmd,
    policy_cmd,
    revoke_cmd,
    serve_cmd,
)
from meshca.config import ConfigError

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
meshca: a zero-trust identity and certificate authority for service meshes.

Proxies send a CSR and their Kubernetes service-account token over gRPC (meshca's own
API or Istio's CA API on the same port) and get a short-lived X.509 SVID for
spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.

Start here:  meshca dev serve --demo    (a local CA and token issuer, no cluster needed)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshca",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve_cmd.register(commands)
    agent_cmd.register(commands)
    dev_cmd.register(commands)
    ca_cmd.register(commands)
    audit_cmd.register(commands)
    policy_cmd.register(commands)
    db_cmd.register(commands)
    revoke_cmd.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ConfigError as exc:
        print(f"meshca: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
