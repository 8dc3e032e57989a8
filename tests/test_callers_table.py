"""The table of callers in docs/design.md is the one in meshca/core/callers.py, and every
method meshca serves has a row."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from envoy.service.secret.v3 import sds_pb2
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from spiffe._proto import workload_pb2

from meshca.adapters.agent import workload_api
from meshca.adapters.grpc import jwt_servicer, linkerd_servicer
from meshca.adapters.grpc.server import AUDIT_SERVICE_NAME, POLICY_SERVICE_NAMES, SERVICE_NAMES
from meshca.config import Settings
from meshca.core.callers import CALLERS, row_for

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"

Row = tuple[str, tuple[str, ...], str, str]


def _doc_rows() -> list[Row]:
    text = DESIGN.read_text()
    match = re.search(r"<!-- callers:begin -->\n(.*?)<!-- callers:end -->", text, re.DOTALL)
    assert match is not None, "docs/design.md has no callers table"
    lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
    assert lines[0] == "| API | methods | credential | who is allowed |"
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 4, line
        api, methods, credential, allowed = cells
        rows.append(
            (api, tuple(m.strip().strip("`") for m in methods.split(",")), credential, allowed)
        )
    return rows


def _code_rows() -> list[Row]:
    return [(r.api, r.methods, r.credential, r.allowed) for r in CALLERS]


def test_the_doc_table_is_the_code_table_both_ways() -> None:
    doc, code = _doc_rows(), _code_rows()
    assert [r for r in doc if r not in code] == [], "rows only in docs/design.md"
    assert [r for r in code if r not in doc] == [], "rows only in meshca/core/callers.py"
    assert doc == code, "same rows, different order"


def _served_methods() -> set[str]:
    pool = descriptor_pool.Default()
    names = (
        *SERVICE_NAMES,
        *POLICY_SERVICE_NAMES,
        AUDIT_SERVICE_NAME,
        linkerd_servicer.SERVICE_NAME,
        jwt_servicer.SERVICE_NAME,
        # meshca agent's socket.
        workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"].full_name,
        sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    # The agent registers these by name (py-spiffe's stubs predate them).
    methods = {f"{workload_api.SERVICE_NAME}/{m}" for m in workload_api.WIT_METHODS}
    for name in names:
        service = pool.FindServiceByName(name)
        methods |= {f"{service.full_name}/{m.name}" for m in service.methods}
    return methods


def test_every_served_method_has_a_row_and_every_grpc_row_is_served() -> None:
    served = _served_methods()
    assert len(served) >= 19
    for method in served:
        row_for(method)
    in_table = {m for r in CALLERS for m in r.methods if "/" in m and " " not in m}
    assert in_table == served


def test_every_setting_is_in_the_readme_settings_table() -> None:
    readme = (DESIGN.parents[1] / "README.md").read_text()
    documented = set()
    for line in readme.splitlines():
        # A row may name a setting in its first cell or, for a group, in its description.
        if line.startswith("| `--"):
            documented |= set(re.findall(r"`--([a-z0-9-]+)`", line))
    flags = {f.name.replace("_", "-") for f in fields(Settings)}
    assert flags - documented == set(), "settings without a README row"
