"""``meshca ca taint`` in this process on a SQLite database: hostile input and refusals.

Input that cannot be acted on exits 2 with one line saying why, and changes nothing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from meshca import app
from meshca.adapters.clock import SystemClock
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.cli import main as meshca_main
from meshca.config import Settings
from meshca.core.rotation import AuthoritySet

TRUST_DOMAIN = "example.org"


def _meshca(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def data(tmp_path: Path) -> Iterator[str]:
    directory = tmp_path / "data"
    assert _meshca("db", "upgrade", "--data-dir", str(directory))[0] == 0
    settings = Settings(data_dir=directory, trust_domain=TRUST_DOMAIN)
    engine = make_engine(settings.effective_database_url)
    try:
        app.build_authorities(settings, engine, SystemClock()).bootstrap()
    finally:
        engine.dispose()
    yield str(directory)


def _journal(data: str) -> AuthoritySet:
    engine = make_engine(Settings(data_dir=Path(data)).effective_database_url)
    try:
        return SqlAuthorityJournal(engine).load()
    finally:
        engine.dispose()


def _taint(data: str, *args: str) -> tuple[int, str, str]:
    return _meshca("ca", "taint", *args, "--data-dir", data, "--trust-domain", TRUST_DOMAIN)


def _ids(data: str) -> tuple[str, str]:
    authorities = _journal(data)
    root, intermediate = authorities.active_root, authorities.active_intermediate
    assert root is not None and intermediate is not None
    return root.id, intermediate.id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["0" * 64, "--reason", "x"], "no authority has fingerprint", id="unknown"),
        pytest.param(["abcd", "--reason", "x"], "give at least 16", id="short-prefix"),
        pytest.param(["not-hex-at-all!!", "--reason", "x"], "hexadecimal", id="not-hex"),
        pytest.param(["{inter}", "--reason", "r" * 10_240], "limit is 1000", id="10kb-reason"),
        pytest.param(["{inter}", "--reason", "a\nb"], "one line", id="two-line-reason"),
        pytest.param(["{inter}"], "--reason is required", id="no-reason"),
        pytest.param(["{inter}", "--reason", "x", "--by", ""], "by is empty", id="empty-by"),
        pytest.param(
            ["{inter}", "--reason", "x", "--yes-i-understand-peers-may-fail"],
            "goes with --emergency",
            id="yes-without-emergency",
        ),
        pytest.param(
            ["{inter}", "--reason", "x", "--emergency", "--yes-i-understand-peers-may-fail"],
            "refused: --emergency is for roots",
            id="emergency-intermediate",
        ),
        pytest.param(
            ["{root}", "--reason", "x", "--emergency"],
            "refused: --emergency activates the successor root without the propagation delay",
            id="emergency-without-flag",
        ),
    ],
)
def test_hostile_input_exits_2_with_one_line_and_changes_nothing(
    data: str, args: list[str], message: str
) -> None:
    root, inter = _ids(data)
    before = _journal(data).signature()
    code, _, err = _taint(data, *(a.format(root=root, inter=inter) for a in args))
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert len(err) < 600
    assert _journal(data).signature() == before


def test_tainting_twice_is_refused(data: str) -> None:
    _, inter = _ids(data)
    assert _taint(data, inter, "--reason", "leaked")[0] == 0
    code, _, err = _taint(data, inter, "--reason", "leaked again")
    assert code == 2 and f"refused: intermediate {inter} was already tainted" in err


def test_the_only_root_without_emergency_waits_out_the_propagation_delay(data: str) -> None:
    root, _ = _ids(data)
    code, out, err = _taint(data, root, "--reason", "HSM audit failed", "--by", "sec")
    assert code == 0, err
    assert "prepare-root" in out and "activate-root" not in out.split("next:")[0]
    authorities = _journal(data)
    tainted = authorities.get(root)
    assert tainted is not None and tainted.state == "active" and tainted.tainted_at is not None
    successor = authorities.prepared_root
    assert successor is not None and successor.tainted_at is None
    assert "activate-root" in out  # the plan says when it takes over
    status = _meshca("ca", "status", "--data-dir", data, "--trust-domain", TRUST_DOMAIN)[1]
    assert "active TAINTED" in status
    # Tainting the waiting successor removes it; the rules prepare another at once.
    code, out, err = _taint(data, successor.id, "--reason", "made on a bad host")
    assert code == 0, err
    removed = _journal(data).get(successor.id)
    assert removed is not None and removed.state == "removed"


def test_the_full_fingerprint_with_colons_works(data: str) -> None:
    authorities = _journal(data)
    inter = authorities.active_intermediate
    assert inter is not None
    colons = ":".join(inter.fingerprint[i : i + 2].upper() for i in range(0, 64, 2))
    code, out, err = _taint(data, colons, "--reason", "leaked")
    assert code == 0, err
    assert f"tainted intermediate {inter.id}" in out
    after = _journal(data)
    assert after.active_intermediate is not None and after.active_intermediate.id != inter.id


def test_without_a_database_it_says_what_to_do(tmp_path: Path) -> None:
    code, _, err = _taint(str(tmp_path / "none"), "0" * 16, "--reason", "x")
    assert code == 1 and "no CA in" in err
