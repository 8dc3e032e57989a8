"""``meshca revoke`` in this process on a SQLite database: hostile input and --force.

Input that cannot be acted on exits 2 with one line saying why, and changes nothing.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from meshca.cli import main as meshca_main

TRUST_DOMAIN = "example.org"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"


def _meshca(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def data(tmp_path: Path) -> str:
    directory = str(tmp_path / "data")
    assert _meshca("db", "upgrade", "--data-dir", directory)[0] == 0
    return directory


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--serial", "xyz"], "is not hexadecimal", id="fail/serial-not-hex"),
        pytest.param(["--serial", "f" * 41], "at most 40", id="fail/serial-too-long"),
        pytest.param(
            ["--spiffe-id", "spiffe://elsewhere.org/ns/a/sa/b"],
            "outside this CA's trust domain",
            id="fail/other-trust-domain",
        ),
        pytest.param(
            ["--spiffe-id", f"spiffe://{TRUST_DOMAIN}/ns/a/../b"],
            "'.' or '..' segment",
            id="fail/dot-dot",
        ),
        pytest.param(
            ["--spiffe-id-prefix", f"spiffe://{TRUST_DOMAIN}/ns/meshca"],
            "refused: spiffe://example.org/ns/meshca would deny meshca's own identity",
            id="refused/own-identity",
        ),
        pytest.param(
            ["--spiffe-id-prefix", f"spiffe://{TRUST_DOMAIN}"],
            "would deny every identity of the trust domain",
            id="refused/whole-domain",
        ),
        pytest.param(["--serial", "1f", "--reason", ""], "reason is empty", id="fail/no-reason"),
        pytest.param(
            ["--serial", "1f", "--reason", "r" * 10_240], "limit is 1000", id="fail/10kb-reason"
        ),
        pytest.param(
            ["--serial", "1f", "--until", "2001-01-01T00:00:00Z"],
            "is not in the future",
            id="fail/until-past",
        ),
        pytest.param(
            ["--serial", "1f", "--until", "2031-01-01T00:00:00"],
            "needs a time zone",
            id="fail/until-naive",
        ),
        pytest.param(["--serial", "1f", "--until", "soon"], "neither a time", id="fail/until"),
        pytest.param(
            ["--serial", "1f", "--spiffe-id", WEB], "give exactly one of", id="fail/two-targets"
        ),
        pytest.param(["--reason", "x"], "give exactly one of", id="fail/no-target"),
        pytest.param(["lift", "999"], "no deny-list entry 999", id="fail/lift-unknown"),
        pytest.param(["lift", "x1"], "is not a number", id="fail/lift-not-a-number"),
        pytest.param(["lift"], "needs an entry id", id="fail/lift-no-id"),
        pytest.param(["purge"], "unknown arguments", id="fail/unknown-word"),
    ],
)
def test_hostile_revokes_exit_2_with_one_line_and_change_nothing(
    data: str, args: list[str], message: str
) -> None:
    defaults = [] if "--reason" in args or args[:1] == ["lift"] else ["--reason", "leak"]
    code, _, stderr = _meshca(
        "revoke", *args, *defaults, "--data-dir", data, "--trust-domain", TRUST_DOMAIN
    )
    assert code == 2, stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and len(stderr) < 400
    code, listed, _ = _meshca("revoke", "list", "--all", "--data-dir", data)
    assert code == 0 and listed.strip() == "the deny-list is empty"


def test_force_allows_a_revoke_of_meshcas_own_namespace(data: str) -> None:
    prefix = f"spiffe://{TRUST_DOMAIN}/ns/meshca"
    result = _meshca(
        "revoke", "--spiffe-id-prefix", prefix, "--reason", "the CA's namespace is compromised",
        "--force", "--data-dir", data, "--trust-domain", TRUST_DOMAIN,
    )  # fmt: skip
    assert result[0] == 0, result
    assert re.match(
        r"deny-list entry 1: spiffe-id-prefix spiffe://example.org/ns/meshca;", result[1]
    )


def test_without_a_database_revoke_says_what_to_do(tmp_path: Path) -> None:
    code, _, stderr = _meshca("revoke", "list", "--data-dir", str(tmp_path / "none"))
    assert code == 1 and "no database in" in stderr and "meshca serve" in stderr


def test_until_accepts_a_duration_and_list_shows_it(data: str) -> None:
    code, out, _ = _meshca(
        "revoke", "--serial", "0A:1B", "--until", "2h", "--reason", "leak", "--by", "bob",
        "--data-dir", data, "--trust-domain", TRUST_DOMAIN,
    )  # fmt: skip
    assert code == 0 and "serial a1b until " in out and "does not block issuance" in out
    code, listed, _ = _meshca("revoke", "list", "--data-dir", data)
    assert code == 0 and re.search(r"^1\s+serial\s+a1b\s+active\s+bob\s", listed, re.M), listed


def test_audit_query_shows_revokes_and_lifts_with_their_detail(data: str) -> None:
    prefix = f"spiffe://{TRUST_DOMAIN}/ns/shop"
    code, _, err = _meshca(
        "revoke", "--spiffe-id-prefix", prefix, "--reason", "namespace compromised",
        "--by", "secteam", "--data-dir", data, "--trust-domain", TRUST_DOMAIN,
    )  # fmt: skip
    assert code == 0, err
    assert _meshca("revoke", "lift", "1", "--by", "bob", "--data-dir", data)[0] == 0
    code, out, _ = _meshca("audit", "query", "--data-dir", data, "--outcome", "revoked")
    assert code == 0
    assert f"deny-list entry 1: spiffe-id-prefix {prefix}; by secteam; reason: namespace" in out
    code, out, _ = _meshca("audit", "query", "--data-dir", data, "--spiffe-id-prefix", prefix)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3  # header, the lift, the revoke (newest first)
    assert (
        " lifted " in lines[1] and "lifted: spiffe-id-prefix" in lines[1] and "by bob" in lines[1]
    )
