"""``meshca policy`` lint, test, explain and diff: what a security team runs, in process."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshca.adapters.storage import create_schema, make_engine
from meshca.adapters.storage.decision_log import SqlDecisionLog, record_to_dict
from meshca.cli import main
from meshca.core.policy import DecisionRecord

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "policy-tests" / "example-cases.yaml"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BACKEND = "spiffe://cluster.local/ns/shop/sa/backend"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


def test_lint_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "lint", str(REPO / "policies"))
    assert code == 0
    assert "7 policies in 4 files" in out and "0 errors, 0 warnings" in out


def test_lint_reports_a_broken_file_with_its_line(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "bad.yaml").write_text(
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\n"
        "spec:\n  action: DENIED\n"
    )
    code, _, err = run(capsys, "policy", "lint", str(policy_dir))
    assert code == 1
    assert "error: bad.yaml, document 1, line 5: spec.action: 'DENIED' is not one of" in err
    assert "nothing would be loaded" in err


def test_lint_errors_and_strict_warnings(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "wide.yaml").write_text(
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: wide, "
        "namespace: shop}\nspec:\n  rules:\n    - {}\n"
    )
    code, out, _ = run(capsys, "policy", "lint", str(policy_dir))
    assert code == 0 and "warning: shop/wide rule 0: allows every request" in out
    code, _, _ = run(capsys, "policy", "lint", "--strict", str(policy_dir))
    assert code == 1
    code, out, _ = run(capsys, "policy", "lint", "--format", "json", str(policy_dir))
    assert json.loads(out)["findings"][0]["policy"] == "shop/wide"
    (policy_dir / "wide.yaml").write_text(
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: wide}\n"
        "spec:\n  rules:\n    - {}\n"
    )
    code, out, _ = run(capsys, "policy", "lint", str(policy_dir))
    assert code == 1 and "error: wide rule 0: allows every request to every workload" in out


def test_test_passes_and_fails(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "policy", "test", str(policy_dir), "--cases", str(CASES))
    assert code == 0 and "13 passed, 0 failed" in out
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        f"cases:\n  - name: admin is open\n    from: {FRONTEND}\n    to: {BACKEND}\n"
        "    path: /admin\n    expect: ALLOW\n"
    )
    code, out, _ = run(capsys, "policy", "test", str(policy_dir), "--cases", str(wrong))
    assert code == 1
    assert "FAIL  admin is open: expected ALLOW, got DENY" in out and "0 passed, 1 failed" in out


def test_test_refuses_a_bad_cases_file(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases:\n  - name: x\n    to: a\n    expect: MAYBE\n")
    code, _, err = run(capsys, "policy", "test", str(policy_dir), "--cases", str(bad))
    assert code == 2 and "line 4: cases[0].expect" in err


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "policy",
        "explain",
        str(REPO / "policies"),
        "--from",
        FRONTEND,
        "--to",
        BACKEND,
        "--method",
        "DELETE",
        "--path",
        "/api/products/1",
    )
    assert code == 0
    assert "decision: DENY (no-allow-match)" in out
    assert "operation.methods: request.method 'DELETE' is not in ['GET', 'HEAD']" in out
    code, out, _ = run(
        capsys, "policy", "explain", str(REPO / "policies"), "--to", BACKEND, "--path", "/admin/"
    )
    assert "decided by: admin-deny rule 0 (admin-deny.yaml:4)" in out


def _decisions() -> list[DecisionRecord]:
    def record(path: str, allowed: bool) -> DecisionRecord:
        return DecisionRecord(
            time=datetime(2026, 1, 1, tzinfo=UTC),
            api="envoy.ext_authz.v3",
            allowed=allowed,
            reason="x",
            version="old",
            policy=None,
            rule=None,
            source_principal=FRONTEND,
            destination_principal=BACKEND,
            method="GET",
            path=path,
            host="backend",
            headers={},
        )

    return [record("/api/products", True)] * 3 + [record("/api/carts/1", True)]


def test_diff_from_a_json_export(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path
) -> None:
    new = tmp_path / "new"
    shutil.copytree(policy_dir, new)
    (new / "no-products.yaml").write_text(
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-products}\n"
        "spec:\n  action: DENY\n  rules:\n    - to: [{operation: {paths: ['/api/products']}}]\n"
    )
    log = tmp_path / "decisions.json"
    log.write_text(json.dumps([record_to_dict(r) for r in _decisions()]))
    code, out, _ = run(capsys, "policy", "diff", str(policy_dir), str(new), "--decisions", str(log))
    assert code == 1
    assert f"ALLOW -> DENY  {FRONTEND} -> {BACKEND} GET /api/products (x3)" in out
    assert "old: shop/frontend-to-backend; new: no-products" in out
    assert "4 recorded decisions replayed: 3 would change (1 distinct requests)" in out
    code, out, _ = run(
        capsys, "policy", "diff", str(policy_dir), str(policy_dir), "--decisions", str(log)
    )
    assert code == 0 and "0 would change" in out


def test_diff_from_a_data_directory(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    engine = make_engine(f"sqlite:///{data / 'meshca.db'}")
    create_schema(engine)
    store = SqlDecisionLog(engine)
    for record in _decisions():
        store.record(record)
    store.close()
    engine.dispose()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run(
        capsys, "policy", "diff", str(policy_dir), str(empty), "--decisions", str(data)
    )
    assert code == 1 and "4 would change (2 distinct requests)" in out
    code, out, _ = run(capsys, "audit", "decisions", "--data-dir", str(data), "--format", "json")
    assert code == 0 and len(json.loads(out)) == 4


def test_diff_with_an_unreadable_log(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys,
        "policy",
        "diff",
        str(policy_dir),
        str(policy_dir),
        "--decisions",
        str(tmp_path / "missing.json"),
    )
    assert code == 2 and "cannot read decisions" in err


def test_status_says_which_credential_file_it_cannot_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-token"
    code, _, err = run(capsys, "policy", "status", "--token-file", str(missing))
    assert code == 2
    assert f"cannot read {missing}" in err and "Traceback" not in err
