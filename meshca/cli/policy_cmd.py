"""``meshca policy``: lint, test, explain, diff and check the status of authorization policies.

Everything but ``status`` works on a directory of policy files, offline, exactly as the
server would load and evaluate it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshca.adapters.policy_files import load_policy_dir, read_policy_files, read_yaml_documents
from meshca.core.errors import InvalidPolicy, MeshcaError
from meshca.core.policy import (
    AuthzRequest,
    DecisionRecord,
    PolicyFieldError,
    PolicySet,
    evaluate,
    explain,
)
from meshca.core.policy.cases import parse_cases, run_case
from meshca.core.policy.lint import Severity, lint

__all__ = ["register"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _load(directory: str) -> PolicySet | None:
    """The compiled set, or None after printing every problem."""
    try:
        return load_policy_dir(Path(directory))
    except InvalidPolicy as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        count = len(exc.problems)
        print(
            f"{directory}: {count} problem{'s' if count != 1 else ''}; "
            "nothing would be loaded (the server keeps its last good set)",
            file=sys.stderr,
        )
        return None


def _default_allow(args: argparse.Namespace) -> bool:
    return bool(args.default == "allow")


# -- lint ----------------------------------------------------------------------------------


def _lint(args: argparse.Namespace) -> int:
    policy_set = _load(args.directory)
    if policy_set is None:
        return EXIT_FAILED
    findings = lint(policy_set.policies, args.trust_domain or ("cluster.local",))
    errors = [f for f in findings if f.severity is Severity.ERROR]
    warnings = [f for f in findings if f.severity is Severity.WARNING]
    if args.format == "json":
        print(
            json.dumps(
                {
                    "version": policy_set.version,
                    "policies": len(policy_set),
                    "findings": [
                        {
                            "severity": f.severity.value,
                            "policy": f.policy.key,
                            "file": f.policy.file,
                            "line": f.policy.line,
                            "rule": f.rule,
                            "message": f.message,
                        }
                        for f in findings
                    ],
                },
                indent=2,
            )
        )
    else:
        for finding in findings:
            print(finding)
        files = len(read_policy_files(Path(args.directory)).files)
        print(
            f"{len(policy_set)} policies in {files} files, version {policy_set.version}: "
            f"{len(errors)} errors, {len(warnings)} warnings"
        )
    if errors or (args.strict and warnings):
        return EXIT_FAILED
    return EXIT_OK


# -- test ----------------------------------------------------------------------------------


def _read_cases(path: Path) -> list[Any] | None:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {name}: {exc}", file=sys.stderr)
        return None
    try:
        documents = list(read_yaml_documents(text, name))
    except InvalidPolicy as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None
    cases: list[Any] = []
    for document in documents:
        try:
            cases += parse_cases(document.value)
        except PolicyFieldError as exc:
            line = document.line_of(exc.field)
            print(
                f"error: {name}, document {document.index}, line {line}: {exc.field}: "
                f"{exc.message}",
                file=sys.stderr,
            )
            return None
    if not cases:
        print(f"error: {name} holds no cases", file=sys.stderr)
        return None
    return cases


def _test(args: argparse.Namespace) -> int:
    policy_set = _load(args.directory)
    if policy_set is None:
        return EXIT_FAILED
    cases = _read_cases(Path(args.cases))
    if cases is None:
        return EXIT_USAGE
    failed = 0
    for case in cases:
        result = run_case(policy_set, case, default_allow=_default_allow(args))
        outcome = "ALLOW" if result.decision.allowed else "DENY"
        if result.passed:
            if args.verbose:
                print(f"PASS  {case.name}: {outcome} by {result.decision.decided_by}")
        else:
            failed += 1
            print(f"FAIL  {case.name}: {result.message}")
            print(f"      ({result.decision.detail})")
    passed = len(cases) - failed
    print(f"policy cases: {passed} passed, {failed} failed (policy set {policy_set.version})")
    return EXIT_FAILED if failed else EXIT_OK


# -- explain -------------------------------------------------------------------------------


def _headers(values: Sequence[str] | None) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for item in values or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"meshca: --header takes NAME=VALUE, not {item!r}", file=sys.stderr)
            return None
        headers[name.strip().lower()] = value
    return headers


def _explain(args: argparse.Namespace) -> int:
    headers = _headers(args.header)
    if headers is None:
        return EXIT_USAGE
    policy_set = _load(args.directory)
    if policy_set is None:
        return EXIT_FAILED
    request = AuthzRequest(
        source_principal=args.from_ or None,
        destination_principal=args.to,
        method=args.method,
        path=args.path,
        host=args.host or "",
        headers=headers,
        source_ip=args.source_ip,
        destination_port=args.port,
        sni=args.sni,
    )
    print(explain(policy_set, request, default_allow=_default_allow(args)).render())
    return EXIT_OK


# -- diff ----------------------------------------------------------------------------------


def _records_from_file(path: Path) -> list[DecisionRecord]:
    from meshca.adapters.storage.decision_log import record_from_dict

    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    items: list[Any]
    if stripped.startswith("["):
        items = json.loads(text)
    else:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [record_from_dict(item) for item in items]


def _records_from_database(url: str, limit: int) -> list[DecisionRecord]:
    from meshca.adapters.storage.decision_log import SqlDecisionLog
    from meshca.adapters.storage.engine import make_engine

    engine = make_engine(url)
    try:
        store = SqlDecisionLog(engine)
        try:
            return list(asyncio.run(store.list(limit=limit)))
        finally:
            store.close()
    finally:
        engine.dispose()


def _decision_records(source: str, limit: int) -> list[DecisionRecord]:
    """From a data directory, a database URL, or a JSON / JSON-lines export."""
    if "://" in source:
        return _records_from_database(source, limit)
    path = Path(source)
    if path.is_dir():
        database = path / "meshca.db"
        if not database.exists():
            raise ValueError(f"no decision record in {source} (no meshca.db)")
        return _records_from_database(f"sqlite:///{database.resolve()}", limit)
    return _records_from_file(path)[:limit]


def _describe(request: AuthzRequest) -> str:
    source = request.source_principal or "(no principal)"
    return f"{source} -> {request.destination_principal} {request.method} {request.path}"


def _diff(args: argparse.Namespace) -> int:
    old, new = _load(args.old), _load(args.new)
    if old is None or new is None:
        return EXIT_USAGE
    try:
        records = _decision_records(args.decisions, args.limit)
    except (OSError, ValueError, MeshcaError) as exc:
        message = exc.message if isinstance(exc, MeshcaError) else str(exc)
        print(f"meshca: cannot read decisions from {args.decisions}: {message}", file=sys.stderr)
        return EXIT_USAGE
    default_allow = _default_allow(args)
    changed: dict[tuple[object, ...], list[Any]] = {}
    recorded_differently = 0
    for record in records:
        request = record.request()
        before = evaluate(old, request, default_allow=default_allow)
        after = evaluate(new, request, default_allow=default_allow)
        if before.allowed != record.allowed:
            recorded_differently += 1
        if before.allowed == after.allowed:
            continue
        key = (
            request.source_principal,
            request.destination_principal,
            request.method,
            request.path,
            request.host,
            tuple(sorted(request.headers.items())),
        )
        entry = changed.setdefault(key, [request, before, after, 0])
        entry[3] += 1
    for request, before, after, count in changed.values():
        arrow = f"{'ALLOW' if before.allowed else 'DENY'} -> {'ALLOW' if after.allowed else 'DENY'}"
        times = f" (x{count})" if count > 1 else ""
        print(f"{arrow}  {_describe(request)}{times}")
        print(f"    old: {before.decided_by}; new: {after.decided_by}")
    new_headers = new.header_names - old.header_names
    if new_headers:
        print(
            "note: NEW refers to headers OLD did not ("
            + ", ".join(sorted(new_headers))
            + "); the recorded requests carry no values for them"
        )
    if recorded_differently:
        print(
            f"note: {recorded_differently} recorded decisions differ from what OLD decides now "
            "(they were made under another policy set or default)"
        )
    total = sum(entry[3] for entry in changed.values())
    print(
        f"{len(records)} recorded decisions replayed: {total} would change "
        f"({len(changed)} distinct requests); old {old.version}, new {new.version}"
    )
    return EXIT_FAILED if changed else EXIT_OK


# -- status --------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    import grpc

    from meshca.adapters.grpc._gen.meshca.v1 import policy_pb2, policy_pb2_grpc

    metadata = []
    try:
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
            metadata.append(("authorization", f"Bearer {token}"))
        roots = Path(args.ca_file).read_bytes() if args.ca_file else None
        client = (
            (Path(args.key).read_bytes(), Path(args.cert).read_bytes())
            if args.cert and args.key
            else (None, None)
        )
    except OSError as error:
        print(f"meshca: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.plaintext:
        channel = grpc.insecure_channel(args.server)
    else:
        channel = grpc.secure_channel(
            args.server,
            grpc.ssl_channel_credentials(roots, *client),
            options=[("grpc.ssl_target_name_override", args.server_name)],
        )
    with channel:
        try:
            status = policy_pb2_grpc.PolicyServiceStub(channel).Status(
                policy_pb2.PolicyStatusRequest(), metadata=metadata, timeout=10
            )
        except grpc.RpcError as exc:
            print(f"meshca: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_FAILED
    print(f"version         {status.version or '(none loaded: every request is denied)'}")
    print(f"policies        {status.policies}")
    print(f"healthy         {'yes' if status.healthy else 'no'}")
    print(f"reloads         {status.reloads} ({status.reload_failures} rejected)")
    print(f"decisions       {status.allowed} allowed, {status.denied} denied")
    print(f"records         {status.records_failed} failed, {status.records_dropped} dropped")
    if status.last_error:
        print("newest files rejected (the set above is still served):")
        for line in status.last_error.splitlines():
            print(f"  {line}")
    return EXIT_OK if status.healthy else EXIT_FAILED


# -- registration --------------------------------------------------------------------------


def _default_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default",
        choices=("deny", "allow"),
        default="deny",
        help="the mesh default when no ALLOW policy selects a workload (default deny)",
    )


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "policy",
        help="lint, test, explain and diff authorization policies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    linter = sub.add_parser(
        "lint",
        help="load a policy directory and report errors and warnings",
        description="Load every policy file under DIRECTORY as the server would, then report "
        "rules that match everything, can never match, are shadowed or denied first, and "
        "principals of unknown trust domains. Exit 1 on any error (or warning with --strict).",
    )
    linter.add_argument("directory")
    linter.add_argument(
        "--trust-domain",
        action="append",
        help="a trust domain the mesh knows; repeat (default cluster.local)",
    )
    linter.add_argument("--strict", action="store_true", help="warnings fail too")
    linter.add_argument("--format", choices=("text", "json"), default="text")
    linter.set_defaults(run=_lint)

    tester = sub.add_parser(
        "test",
        help="check a table of requests against their expected decisions",
        description="Decide each case of the --cases YAML table with the policies in "
        "DIRECTORY; exit 1 if any decision differs from the expected one.",
    )
    tester.add_argument("directory")
    tester.add_argument("--cases", required=True, metavar="FILE")
    tester.add_argument("--verbose", "-v", action="store_true", help="print passing cases too")
    _default_flag(tester)
    tester.set_defaults(run=_test)

    explainer = sub.add_parser(
        "explain",
        help="decide one request and show which rule decided, or why none matched",
    )
    explainer.add_argument("directory")
    explainer.add_argument("--from", dest="from_", metavar="SPIFFE_ID", default="")
    explainer.add_argument("--to", metavar="SPIFFE_ID", required=True)
    explainer.add_argument("--method", default="GET")
    explainer.add_argument("--path", default="/")
    explainer.add_argument("--host", default="")
    explainer.add_argument("--port", type=int, help="destination port")
    explainer.add_argument("--header", action="append", metavar="NAME=VALUE")
    explainer.add_argument("--source-ip")
    explainer.add_argument("--sni")
    _default_flag(explainer)
    explainer.set_defaults(run=_explain)

    differ = sub.add_parser(
        "diff",
        help="replay recorded decisions through a new policy set; list what would change",
        description="Replay recorded decisions (a meshca data directory, a database URL, or "
        "the JSON of 'meshca audit decisions --format json') through OLD and NEW and list "
        "every request whose outcome would change. Exit 1 if any would.",
    )
    differ.add_argument("old", metavar="OLD")
    differ.add_argument("new", metavar="NEW")
    differ.add_argument("--decisions", required=True, metavar="LOG")
    differ.add_argument("--limit", type=int, default=100_000, help="newest N decisions")
    _default_flag(differ)
    differ.set_defaults(run=_diff)

    status = sub.add_parser(
        "status",
        help="ask a running server which policy set it serves and whether the newest loaded",
        description="Ask a running server's policy API (a policy admin's client SVID, or "
        "the --policy-token-file token) which policy set it serves.",
    )
    status.add_argument("--server", default="127.0.0.1:15012", metavar="HOST:PORT")
    status.add_argument("--plaintext", action="store_true", help="the server runs --plaintext")
    status.add_argument("--ca-file", help="PEM roots to verify the server (meshca ca bundle)")
    status.add_argument("--server-name", default="localhost", help="name in its certificate")
    status.add_argument("--token-file", help="file holding the policy bearer token")
    status.add_argument("--cert", help="a policy admin's client SVID, PEM (--policy-listen port)")
    status.add_argument("--key", help="the client SVID's private key, PEM")
    status.set_defaults(run=_status)
