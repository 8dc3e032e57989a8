"""Policy files: the examples load, problems carry file/document/line/field, hostile YAML is
refused without harm, and a directory loads all-or-nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshca.adapters.policy_files import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    DirectoryPolicySource,
    load_policy_dir,
    read_policy_files,
    read_yaml_documents,
)
from meshca.core.errors import InvalidPolicy
from meshca.core.policy import PolicyProblem, evaluate
from meshca.core.policy.cases import parse_cases, run_case
from tests.core.policy.helpers import req, workload

REPO = Path(__file__).resolve().parents[2]
GOOD = """\
apiVersion: meshca.io/v1
kind: AuthorizationPolicy
metadata:
  name: good
  namespace: shop
spec:
  rules:
    - from:
        - source:
            principals: ["spiffe://cluster.local/ns/shop/sa/web"]
"""


def problems(directory: Path) -> list[PolicyProblem]:
    with pytest.raises(InvalidPolicy) as caught:
        load_policy_dir(directory)
    found = [p for p in caught.value.problems if isinstance(p, PolicyProblem)]
    assert found
    return found


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_the_examples_load_and_pass_their_cases() -> None:
    policy_set = load_policy_dir(REPO / "policies")
    assert len(policy_set) == 7
    assert {p.ref.key for p in policy_set.policies} >= {
        "default-deny",
        "payments/namespace-isolation",
        "shop/frontend-to-backend",
        "admin-deny",
    }
    cases_file = REPO / "policy-tests" / "example-cases.yaml"
    (document,) = read_yaml_documents(cases_file.read_text(), str(cases_file))
    for case in parse_cases(document.value):
        result = run_case(policy_set, case, default_allow=False)
        assert result.passed, (case.name, result.message)


def test_a_problem_names_file_document_line_and_field(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(
        tmp_path,
        "sub/b.yaml",
        GOOD.replace("good", "first")
        + "---\n"
        + GOOD.replace("good", "second").replace("principals", "principal"),
    )
    (problem,) = problems(tmp_path)
    assert (problem.file, problem.document, problem.line) == ("sub/b.yaml", 2, 21)
    assert problem.field == "spec.rules[0].from[0].source.principal"
    assert str(problem).startswith("sub/b.yaml, document 2, line 21: spec.rules[0]")


def test_wrong_type_points_at_its_value(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.replace('["spiffe://cluster.local/ns/shop/sa/web"]', "yes"))
    (problem,) = problems(tmp_path)
    assert problem.line == 10 and "expected a list, got a boolean" in problem.message


def test_every_bad_document_is_reported_and_nothing_loads(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD.replace("good", "b").replace("ALLOW", "x") + "  oops: 1\n")
    write(tmp_path, "c.yaml", "kind: Nope\n")
    found = problems(tmp_path)
    assert [p.file for p in found] == ["b.yaml", "c.yaml"]


def test_duplicate_policy_names(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    (problem,) = problems(tmp_path)
    assert problem.file == "b.yaml" and "already defined in a.yaml" in problem.message


HOSTILE = {
    "fail/duplicate-key": (
        "apiVersion: meshca.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        "spec:\n  action: ALLOW\n  action: DENY\n",
        6,
        "duplicate key",
    ),
    "fail/alias": (
        "a: &x [1]\nb: *x\n",
        1,
        "anchors",
    ),
    "fail/anchor-bomb": (
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
        "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
        "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
        "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n",
        1,
        "anchors",
    ),
    "fail/merge-key": ("a: {<<: {b: 1}}\n", 1, "not allowed"),
    "fail/python-tag": ("!!python/object/apply:os.system ['true']\n", 1, "not allowed"),
    "fail/custom-tag": ("spec: !Ref other\n", 1, "not allowed"),
    "fail/timestamp": ("metadata: {name: 2024-01-01}\n", 1, "not allowed"),
    "fail/binary": ("a: !!binary aGVsbG8=\n", 1, "not allowed"),
    "fail/non-text-key": ("1: a\n", 1, "plain text"),
    "fail/complex-key": ("? [a, b]\n: c\n", 1, "plain text"),
    "fail/syntax": ("a: [1, 2\nb: 3\n", 2, "not valid YAML"),
    "fail/tab-indent": ("a:\n\tb: 1\n", 2, "not valid YAML"),
    "fail/deeply-nested": ("a: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nest"),
    "fail/deeply-nested-maps": (
        "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 60)),
        33,
        f"deeper than {MAX_DEPTH} levels",
    ),
    "fail/not-a-mapping": ("just text\n", 1, "expected a mapping"),
    "fail/list-document": ("- a\n- b\n", 1, "expected a mapping"),
}


@pytest.mark.parametrize(("text", "line", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_yaml_is_refused_with_its_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    write(tmp_path, "hostile.yaml", text)
    started = time.monotonic()
    (problem,) = problems(tmp_path)
    assert time.monotonic() - started < 2
    assert problem.file == "hostile.yaml"
    assert problem.line == line, problem
    assert message in str(problem)


def test_huge_file_is_not_read(tmp_path: Path) -> None:
    write(tmp_path, "huge.yaml", b"# " + b"x" * MAX_FILE_BYTES + b"\n")
    (problem,) = problems(tmp_path)
    assert problem.file == "huge.yaml" and "larger than" in problem.message


def test_not_utf8(tmp_path: Path) -> None:
    write(tmp_path, "latin1.yaml", "metadata: {name: caf\xe9}\n".encode("latin-1"))
    (problem,) = problems(tmp_path)
    assert "not UTF-8" in problem.message


def test_many_values_and_long_strings_are_bounded(tmp_path: Path) -> None:
    long_principal = "spiffe://cluster.local/" + "a" * 5000
    write(tmp_path, "a.yaml", GOOD.replace("spiffe://cluster.local/ns/shop/sa/web", long_principal))
    (problem,) = problems(tmp_path)
    assert problem.field == "spec.rules[0].from[0].source.principals[0]"
    assert "longer than" in problem.message


def test_what_is_read_and_what_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "a.yml", GOOD)
    write(tmp_path, "nested/deeper/b.yaml", GOOD.replace("good", "b"))
    write(tmp_path, "README.md", "not policy")
    write(tmp_path, ".hidden.yaml", "broken: [")
    write(tmp_path, "..data/c.yaml", "broken: [")
    write(tmp_path, "empty.yaml", "# nothing here\n---\n")
    policy_set = load_policy_dir(tmp_path)
    assert sorted(p.ref.file for p in policy_set.policies) == ["a.yml", "nested/deeper/b.yaml"]


def test_missing_directory(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path / "nope")
    assert "not a directory" in problem.message


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD)
    first = read_policy_files(tmp_path).version
    assert read_policy_files(tmp_path).version == first
    assert load_policy_dir(tmp_path).version == first
    write(tmp_path, "a.yaml", GOOD + "# a comment changes the content\n")
    second = read_policy_files(tmp_path).version
    assert second != first
    (tmp_path / "a.yaml").rename(tmp_path / "b.yaml")
    assert read_policy_files(tmp_path).version not in (first, second)
    source = DirectoryPolicySource(tmp_path)
    assert source.version() == source.load().version


def test_a_large_valid_set_loads_quickly(tmp_path: Path) -> None:
    documents = [
        GOOD.replace("name: good", f"name: p{i}").replace("namespace: shop", f"namespace: ns{i}")
        for i in range(2000)
    ]
    write(tmp_path, "many.yaml", "---\n".join(documents))
    started = time.monotonic()
    policy_set = load_policy_dir(tmp_path)
    assert len(policy_set) == 2000
    assert time.monotonic() - started < 10
    decision = evaluate(policy_set, req(workload("shop", "web"), workload("ns1999", "api")))
    assert decision.allowed and decision.decided_by == "ns1999/p1999"
