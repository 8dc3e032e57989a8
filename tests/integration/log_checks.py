"""Checks that the issuance log lost nothing: every certificate a client received has its
record, the leaf indexes run 0..n-1, and ``meshca audit verify`` recomputes the log."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field

from sqlalchemy import Engine, text

from meshca.cli import main as meshca_main


@dataclass(frozen=True)
class LogCheck:
    """What ``check_log`` found; ``ok`` when nothing is missing and the indexes hold."""

    records: int
    issued: int
    #: Received certificates without an ISSUED record of the same serial (and fingerprint).
    missing: list[str] = field(default_factory=list)
    #: Gaps, duplicates, or a log state that disagrees with the rows.
    index_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.index_problems


def check_log(engine: Engine, received: Mapping[str, str | None]) -> LogCheck:
    """Compare the database with ``received`` (serial -> SHA-256 fingerprint, or None to
    match the serial alone), read in one transaction so concurrent commits cannot skew it.

    A record may exist for a certificate no client received (its response was lost in the
    crash); the reverse is what this looks for.
    """
    with engine.connect() as connection, connection.begin():
        rows = connection.execute(
            text("SELECT leaf_index, outcome, serial, fingerprint_sha256 FROM issuance_record")
        ).all()
        tree_size, pruned_below = connection.execute(
            text("SELECT tree_size, pruned_below FROM log_state")
        ).one()
    issued = {serial: print_ for _, outcome, serial, print_ in rows if outcome == "issued"}
    missing = [
        serial
        for serial, fingerprint in received.items()
        if serial not in issued or fingerprint not in (None, issued[serial])
    ]
    return LogCheck(
        records=len(rows),
        issued=len(issued),
        missing=sorted(missing),
        index_problems=_index_problems(
            [index for index, *_ in rows],
            [serial for _, outcome, serial, _ in rows if outcome == "issued"],
            tree_size,
            pruned_below,
        ),
    )


def _index_problems(
    indexes: Sequence[int], serials: Sequence[str], tree_size: int, pruned_below: int
) -> list[str]:
    problems = []
    counts = Counter(indexes)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
        problems.append(f"leaf indexes used twice: {duplicates[:10]}")
    gaps = sorted(set(range(pruned_below, tree_size)) - counts.keys())
    if gaps:
        problems.append(f"{len(gaps)} leaf indexes without a record, first {gaps[:10]}")
    beyond = sorted(i for i in counts if not pruned_below <= i < tree_size)
    if beyond:
        problems.append(f"records outside the log's {pruned_below}..{tree_size - 1}: {beyond[:10]}")
    twice = sorted(s for s, n in Counter(serials).items() if n > 1)
    if twice:
        problems.append(f"serials issued twice: {twice[:10]}")
    return problems


def assert_log_complete(engine: Engine, received: Mapping[str, str | None]) -> int:
    """``check_log`` as assertions; returns the number of records."""
    check = check_log(engine, received)
    assert not check.index_problems, check.index_problems
    assert not check.missing, f"certificates without a record: {check.missing[:5]}"
    return check.records


def audit_verify(*args: str) -> tuple[int, str]:
    """``meshca audit verify ARGS`` in this process: its exit code and output."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = meshca_main(["audit", "verify", *args])
    return code, out.getvalue()
