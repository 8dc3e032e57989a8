"""``meshca ca``: look at the CA's trust material."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.keys.file_store import FileCaStore

__all__ = ["register"]


def _bundle(args: argparse.Namespace) -> int:
    store = FileCaStore(Path(args.data_dir))
    if not store.exists():
        print(
            f"meshca: no CA in {args.data_dir}: start 'meshca serve --data-dir {args.data_dir}' "
            "once to create it",
            file=sys.stderr,
        )
        return 1
    for root in store.load_roots():
        sys.stdout.write(root.public_bytes(Encoding.PEM).decode())
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser("ca", help="inspect the certificate authority")
    sub = parser.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    bundle = sub.add_parser(
        "bundle",
        help="print the trust bundle (root certificates, PEM)",
        description="Print the roots every meshca certificate verifies against, as PEM.",
    )
    bundle.add_argument(
        "--data-dir", default="meshca-data", help="meshca's data directory (default ./meshca-data)"
    )
    bundle.set_defaults(run=_bundle)
