"""Policy documents (plain mappings, as parsed from YAML) -> ``Policy`` values.

Two dialects share one model:

- ``apiVersion: meshca.io/v1`` -- principals are full SPIFFE IDs (``spiffe://...``);
  ``spec.selector`` selects destinations by ``namespaces``, ``serviceAccounts`` and
  ``spiffeIds`` patterns; without them, ``metadata.namespace`` (if given) limits the
  policy to that namespace, else it applies to the whole mesh.
- ``apiVersion: security.istio.io/v1`` (or ``v1beta1``) -- Istio's documents as they
  are: principals are ``<trust-domain>/ns/<ns>/sa/<sa>`` without a scheme, and a policy
  applies to every workload of its namespace (of the whole mesh in the root namespace).

Every field is checked; a field meshca does not support, an unknown field or a value of
the wrong type raises ``PolicyFieldError`` naming the field. Nothing is ignored silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from ipaddress import ip_network
from typing import Any

from meshca.core.errors import AmbiguousPath, InvalidSpiffeId
from meshca.core.policy.match import HostMatcher, IpMatcher, Matcher, PortMatcher, StringMatcher
from meshca.core.policy.model import Action, Constraint, Policy, PolicyRef, Rule, Selector
from meshca.core.policy.paths import normalize_path
from meshca.core.spiffe import SpiffeId

__all__ = [
    "ISTIO_API_VERSIONS",
    "ISTIO_ROOT_NAMESPACE",
    "MESHCA_API_VERSION",
    "PolicyFieldError",
    "parse_policy",
]

MESHCA_API_VERSION = "meshca.io/v1"
ISTIO_API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
ISTIO_ROOT_NAMESPACE = "istio-system"
KIND = "AuthorizationPolicy"

MAX_RULES = 512
MAX_CLAUSES = 64
MAX_VALUES = 1024
MAX_TEXT = 2048

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_METHOD_RE = re.compile(r"[A-Za-z]{1,32}")
_HEADER_RE = re.compile(r"request\.headers\[([^\[\]]+)\]")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-zA-Z-]+")
_IGNORED_METADATA = frozenset(
    {"uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"}
)

_UNSUPPORTED_SOURCE = {
    "requestPrincipals": "JWT request principals",
    "notRequestPrincipals": "JWT request principals",
    "remoteIpBlocks": "remote (X-Forwarded-For) addresses",
    "notRemoteIpBlocks": "remote (X-Forwarded-For) addresses",
    "serviceAccounts": "source service accounts (use principals)",
    "notServiceAccounts": "source service accounts (use notPrincipals)",
}
_UNSUPPORTED_KEYS = {
    "remote.ip": "remote (X-Forwarded-For) addresses",
    "request.auth.principal": "JWT claims",
    "request.auth.audiences": "JWT claims",
    "request.auth.presenter": "JWT claims",
    "source.serviceAccount": "source service accounts (use source.principal)",
}


class PolicyFieldError(Exception):
    """A document is not a valid policy: ``field`` (dotted path) and ``message`` say why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def _describe(value: object) -> str:
    match value:
        case bool():
            return "a boolean (quote it if you meant text)"
        case None:
            return "nothing (null)"
        case int() | float():
            return "a number"
        case str():
            return "text"
        case list():
            return "a list"
        case dict():
            return "a mapping"
    return type(value).__name__


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PolicyFieldError(field, f"expected a mapping, got {_describe(value)}")
    return value


def _check_keys(
    value: Mapping[str, Any],
    field: str,
    allowed: frozenset[str] | set[str],
    unsupported: Mapping[str, str] | None = None,
) -> None:
    for key in value:
        if key in allowed:
            continue
        where = f"{field}.{key}" if field else str(key)
        if unsupported and key in unsupported:
            raise PolicyFieldError(where, f"not supported by meshca ({unsupported[key]})")
        raise PolicyFieldError(where, f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _text(value: object, field: str, *, max_len: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise PolicyFieldError(field, f"expected text, got {_describe(value)}")
    if not value:
        raise PolicyFieldError(field, "must not be empty")
    if len(value) > max_len:
        raise PolicyFieldError(field, f"longer than {max_len} characters")
    return value


def _list(value: object, field: str, *, max_items: int = MAX_VALUES) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyFieldError(field, f"expected a list, got {_describe(value)}")
    if not value:
        raise PolicyFieldError(field, "must not be empty (leave the field out instead)")
    if len(value) > max_items:
        raise PolicyFieldError(field, f"has more than {max_items} entries")
    return value


def _texts(value: object, field: str) -> tuple[str, ...]:
    items = _list(value, field)
    return tuple(_text(item, f"{field}[{i}]") for i, item in enumerate(items))


def _check_pattern(text: str, field: str) -> None:
    if text == "*":
        return
    stars = text.count("*")
    if stars == 0:
        return
    if stars > 1 or not (text.startswith("*") or text.endswith("*")):
        raise PolicyFieldError(
            field, f"{text!r}: '*' may only stand alone, or once at the start or the end"
        )


class _Dialect:
    """What differs between meshca.io/v1 and Istio's documents."""

    def __init__(self, istio: bool) -> None:
        self.istio = istio

    def principal(self, text: str, field: str) -> str:
        _check_pattern(text, field)
        if text == "*" or text.startswith("*"):
            return text
        if self.istio:
            if text.startswith("spiffe://"):
                raise PolicyFieldError(
                    field,
                    f"{text!r}: Istio principals have no scheme; write "
                    "'<trust-domain>/ns/<namespace>/sa/<service-account>'",
                )
            full = "spiffe://" + text
        else:
            if not text.startswith("spiffe://"):
                raise PolicyFieldError(
                    field,
                    f"{text!r} is not a SPIFFE ID: principals are 'spiffe://...', a prefix "
                    "ending in '*', a suffix starting with '*', or '*'",
                )
            full = text
        if not full.endswith("*"):
            try:
                SpiffeId.parse(full)
            except InvalidSpiffeId as exc:
                raise PolicyFieldError(field, exc.message) from None
        return full


def _strings(
    value: object,
    field: str,
    *,
    check: Callable[[str, str], str] | None = None,
    fold_case: bool = False,
) -> StringMatcher:
    written = _texts(value, field)
    patterns = []
    for i, text in enumerate(written):
        where = f"{field}[{i}]"
        if check is not None:
            patterns.append(check(text, where))
        else:
            _check_pattern(text, where)
            patterns.append(text)
    return StringMatcher.of(tuple(patterns), written=written, fold_case=fold_case)


def _ips(value: object, field: str) -> IpMatcher:
    written = _texts(value, field)
    for i, text in enumerate(written):
        try:
            ip_network(text, strict=False)
        except ValueError:
            raise PolicyFieldError(
                f"{field}[{i}]", f"{text!r} is not an IP address or CIDR block"
            ) from None
    return IpMatcher.of(written)


def _ports(value: object, field: str) -> PortMatcher:
    items = _list(value, field)
    ports = set()
    written = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise PolicyFieldError(where, f"expected a port number, got {_describe(item)}")
        text = str(item)
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise PolicyFieldError(where, f"{text!r} is not a port number (1-65535)")
        ports.add(int(text))
        written.append(text)
    return PortMatcher(tuple(written), frozenset(ports))


def _method(text: str, field: str) -> str:
    if text != "*" and not _METHOD_RE.fullmatch(text):
        raise PolicyFieldError(field, f"{text!r} is not an HTTP method")
    return text.upper()


def _path(text: str, field: str) -> str:
    if "{" in text or "}" in text:
        raise PolicyFieldError(field, f"{text!r}: path templates ({{*}}, {{**}}) are not supported")
    _check_pattern(text, field)
    if "?" in text or "#" in text:
        raise PolicyFieldError(
            field, f"{text!r}: the query and fragment are never part of the matched path"
        )
    if text == "*" or text.startswith("*"):
        return text
    fixed = text[:-1] if text.endswith("*") else text
    if not fixed.startswith("/"):
        raise PolicyFieldError(field, f"{text!r}: a path starts with '/'")
    try:
        normalized = normalize_path(fixed)
    except AmbiguousPath as exc:
        raise PolicyFieldError(field, f"{text!r} can never match: {exc.message}") from None
    if normalized != fixed:
        raise PolicyFieldError(
            field,
            f"{text!r} is not normalized, so it would never match; write {normalized!r}"
            + ("*" if text.endswith("*") else ""),
        )
    return text


def _host(text: str, field: str) -> str:
    _check_pattern(text, field)
    return text.lower()


def _namespace_pattern(text: str, field: str) -> str:
    _check_pattern(text, field)
    return text


def _pair(
    spec: Mapping[str, Any],
    field: str,
    name: str,
    attribute: str,
    build: Callable[[object, str], Matcher],
) -> Constraint | None:
    not_name = "not" + name[0].upper() + name[1:]
    values = build(spec[name], f"{field}.{name}") if name in spec else None
    not_values = build(spec[not_name], f"{field}.{not_name}") if not_name in spec else None
    if values is None and not_values is None:
        return None
    return Constraint(
        field=f"{field}.{name}",
        attribute=attribute,
        values=values,
        not_values=not_values,
        not_field=f"{field}.{not_name}",
    )


_SOURCE_FIELDS = frozenset(
    {"principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks"}
)
_OPERATION_FIELDS = frozenset(
    {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}
)


def _source(value: object, field: str, dialect: _Dialect) -> tuple[Constraint, ...]:
    entry = _mapping(value, field)
    _check_keys(entry, field, {"source"})
    if "source" not in entry:
        raise PolicyFieldError(f"{field}.source", "required")
    where = f"{field}.source"
    source = _mapping(entry["source"], where)
    _check_keys(source, where, _SOURCE_FIELDS, _UNSUPPORTED_SOURCE)
    if not source:
        raise PolicyFieldError(where, "must not be empty (leave out 'from' to match any source)")

    def principals(v: object, f: str) -> Matcher:
        return _strings(v, f, check=dialect.principal)

    found = (
        _pair(source, where, "principals", "source.principal", principals),
        _pair(source, where, "namespaces", "source.namespace", _ns_strings),
        _pair(source, where, "ipBlocks", "source.ip", _ips),
    )
    return tuple(c for c in found if c is not None)


def _ns_strings(value: object, field: str) -> Matcher:
    return _strings(value, field, check=_namespace_pattern)


def _operation(value: object, field: str) -> tuple[Constraint, ...]:
    entry = _mapping(value, field)
    _check_keys(entry, field, {"operation"})
    if "operation" not in entry:
        raise PolicyFieldError(f"{field}.operation", "required")
    where = f"{field}.operation"
    operation = _mapping(entry["operation"], where)
    _check_keys(operation, where, _OPERATION_FIELDS)
    if not operation:
        raise PolicyFieldError(where, "must not be empty (leave out 'to' to match any operation)")

    def hosts(v: object, f: str) -> Matcher:
        return HostMatcher(_strings(v, f, check=_host, fold_case=True))

    def methods(v: object, f: str) -> Matcher:
        return _strings(v, f, check=_method)

    def paths(v: object, f: str) -> Matcher:
        return _strings(v, f, check=_path)

    found = (
        _pair(operation, where, "hosts", "request.host", hosts),
        _pair(operation, where, "ports", "destination.port", _ports),
        _pair(operation, where, "methods", "request.method", methods),
        _pair(operation, where, "paths", "request.path", paths),
    )
    return tuple(c for c in found if c is not None)


def _condition(value: object, field: str, dialect: _Dialect) -> Constraint:
    entry = _mapping(value, field)
    _check_keys(entry, field, {"key", "values", "notValues"})
    if "key" not in entry:
        raise PolicyFieldError(f"{field}.key", "required")
    key = _text(entry["key"], f"{field}.key")
    if "values" not in entry and "notValues" not in entry:
        raise PolicyFieldError(field, "needs values or notValues")
    build: Callable[[object, str], Matcher]
    header = _HEADER_RE.fullmatch(key)
    if header is not None:
        name = header.group(1).strip()
        if not _HEADER_NAME_RE.fullmatch(name):
            raise PolicyFieldError(f"{field}.key", f"{name!r} is not a header name")
        attribute = "header:" + name.lower()
        build = _strings
    elif key == "source.principal":
        attribute = key

        def build(v: object, f: str) -> Matcher:
            return _strings(v, f, check=dialect.principal)

    elif key == "source.namespace":
        attribute, build = key, _ns_strings
    elif key in ("source.ip", "destination.ip"):
        attribute, build = key, _ips
    elif key == "destination.port":
        attribute, build = key, _ports
    elif key == "connection.sni":
        attribute = key

        def build(v: object, f: str) -> Matcher:
            return _strings(v, f, check=_host, fold_case=True)

    elif key in _UNSUPPORTED_KEYS or key.startswith(("request.auth.", "experimental.")):
        what = _UNSUPPORTED_KEYS.get(key, "this attribute")
        raise PolicyFieldError(f"{field}.key", f"{key!r} is not supported by meshca ({what})")
    else:
        raise PolicyFieldError(
            f"{field}.key",
            f"unknown key {key!r} (supported: request.headers[<name>], source.principal, "
            "source.namespace, source.ip, destination.ip, destination.port, connection.sni)",
        )
    values = build(entry["values"], f"{field}.values") if "values" in entry else None
    not_values = build(entry["notValues"], f"{field}.notValues") if "notValues" in entry else None
    return Constraint(
        field=f"{field}.values",
        attribute=attribute,
        values=values,
        not_values=not_values,
        not_field=f"{field}.notValues",
    )


def _rule(value: object, field: str, index: int, dialect: _Dialect) -> Rule:
    if value is None:
        value = {}
    rule = _mapping(value, field)
    _check_keys(rule, field, {"from", "to", "when"})
    sources: tuple[tuple[Constraint, ...], ...] = ()
    operations: tuple[tuple[Constraint, ...], ...] = ()
    conditions: tuple[Constraint, ...] = ()
    if "from" in rule:
        items = _list(rule["from"], f"{field}.from", max_items=MAX_CLAUSES)
        sources = tuple(_source(v, f"{field}.from[{i}]", dialect) for i, v in enumerate(items))
    if "to" in rule:
        items = _list(rule["to"], f"{field}.to", max_items=MAX_CLAUSES)
        operations = tuple(_operation(v, f"{field}.to[{i}]") for i, v in enumerate(items))
    if "when" in rule:
        items = _list(rule["when"], f"{field}.when", max_items=MAX_CLAUSES)
        conditions = tuple(
            _condition(v, f"{field}.when[{i}]", dialect) for i, v in enumerate(items)
        )
    return Rule(index=index, sources=sources, operations=operations, conditions=conditions)


def _name(value: object, field: str) -> str:
    text = _text(value, field, max_len=253)
    if not _NAME_RE.fullmatch(text):
        raise PolicyFieldError(
            field, f"{text!r}: use lower-case letters, digits, '-' and '.' (a Kubernetes name)"
        )
    return text


def _metadata(doc: Mapping[str, Any]) -> tuple[str, str | None]:
    if "metadata" not in doc:
        raise PolicyFieldError("metadata", "required (with a name)")
    metadata = _mapping(doc["metadata"], "metadata")
    _check_keys(
        metadata, "metadata", {"name", "namespace", "labels", "annotations", *_IGNORED_METADATA}
    )
    if "name" not in metadata:
        raise PolicyFieldError("metadata.name", "required")
    name = _name(metadata["name"], "metadata.name")
    namespace = (
        _name(metadata["namespace"], "metadata.namespace") if "namespace" in metadata else None
    )
    for key in ("labels", "annotations"):
        if key in metadata:
            for label, text in _mapping(metadata[key], f"metadata.{key}").items():
                if not isinstance(text, str):
                    raise PolicyFieldError(
                        f"metadata.{key}.{label}", f"expected text, got {_describe(text)}"
                    )
    return name, namespace


def _meshca_selector(spec: Mapping[str, Any], namespace: str | None) -> Selector:
    if "selector" not in spec or spec["selector"] is None:
        return Selector(namespaces=frozenset({namespace}) if namespace else None)
    selector = _mapping(spec["selector"], "spec.selector")
    _check_keys(
        selector,
        "spec.selector",
        {"namespaces", "serviceAccounts", "spiffeIds"},
        {"matchLabels": "meshca cannot see pod labels; select by serviceAccounts or spiffeIds"},
    )
    namespaces = service_accounts = None
    if "namespaces" in selector:
        if namespace is not None:
            raise PolicyFieldError(
                "spec.selector.namespaces",
                "give the namespace in metadata.namespace or here, not both",
            )
        names = _texts(selector["namespaces"], "spec.selector.namespaces")
        namespaces = frozenset(
            _name(n, f"spec.selector.namespaces[{i}]") for i, n in enumerate(names)
        )
    elif namespace is not None:
        namespaces = frozenset({namespace})
    if "serviceAccounts" in selector:
        names = _texts(selector["serviceAccounts"], "spec.selector.serviceAccounts")
        service_accounts = frozenset(
            _name(n, f"spec.selector.serviceAccounts[{i}]") for i, n in enumerate(names)
        )
    spiffe_ids = None
    if "spiffeIds" in selector:
        spiffe_ids = _strings(
            selector["spiffeIds"], "spec.selector.spiffeIds", check=_Dialect(False).principal
        )
    return Selector(namespaces, service_accounts, spiffe_ids)


def _istio_selector(spec: Mapping[str, Any], namespace: str, root_namespace: str) -> Selector:
    if "selector" in spec and spec["selector"] is not None:
        selector = _mapping(spec["selector"], "spec.selector")
        _check_keys(
            selector,
            "spec.selector",
            set(),
            {
                "matchLabels": "meshca cannot see pod labels; leave the selector out to apply "
                "to the whole namespace, or write a meshca.io/v1 policy selecting by "
                "serviceAccounts"
            },
        )
    if namespace == root_namespace:
        return Selector()
    return Selector(namespaces=frozenset({namespace}))


def parse_policy(
    doc: object,
    *,
    file: str = "",
    document: int = 0,
    line: int = 0,
    istio_root_namespace: str = ISTIO_ROOT_NAMESPACE,
) -> Policy:
    """Check one document and compile it; raises ``PolicyFieldError`` naming the field.

    ``file``, ``document`` and ``line`` only label the result (``Policy.ref``).
    """
    body = _mapping(doc, "")
    if "apiVersion" not in body:
        raise PolicyFieldError("apiVersion", f"required ({MESHCA_API_VERSION})")
    api_version = _text(body["apiVersion"], "apiVersion")
    if api_version == MESHCA_API_VERSION:
        istio = False
    elif api_version in ISTIO_API_VERSIONS:
        istio = True
    else:
        raise PolicyFieldError(
            "apiVersion",
            f"{api_version!r} is not supported (use {MESHCA_API_VERSION} or "
            f"{' or '.join(ISTIO_API_VERSIONS)})",
        )
    top = {"apiVersion", "kind", "metadata", "spec"}
    # kubectl's output carries a status; it says nothing about what the policy allows.
    _check_keys(body, "", top | {"status"} if istio else top)
    if body.get("kind") != KIND:
        raise PolicyFieldError("kind", f"must be {KIND}, not {body.get('kind')!r}")
    name, namespace = _metadata(body)
    spec = _mapping({} if body.get("spec") is None else body["spec"], "spec")
    allowed = {"selector", "action", "rules"}
    _check_keys(
        spec,
        "spec",
        allowed,
        {
            "targetRef": "gateway and service targets",
            "targetRefs": "gateway and service targets",
            "provider": "CUSTOM external providers",
        },
    )
    action_text = spec.get("action", "ALLOW")
    if action_text == "CUSTOM":
        raise PolicyFieldError("spec.action", "CUSTOM is not supported by meshca")
    try:
        action = Action(_text(action_text, "spec.action"))
    except ValueError:
        raise PolicyFieldError(
            "spec.action", f"{action_text!r} is not one of ALLOW, DENY, AUDIT"
        ) from None
    dialect = _Dialect(istio)
    if istio:
        if namespace is None:
            raise PolicyFieldError(
                "metadata.namespace",
                "required for Istio policies (kubectl would use its current namespace)",
            )
        selector = _istio_selector(spec, namespace, istio_root_namespace)
    else:
        selector = _meshca_selector(spec, namespace)
    rules: tuple[Rule, ...] = ()
    if "rules" in spec and spec["rules"] is not None:
        if spec["rules"] == []:
            rules = ()
        else:
            items = _list(spec["rules"], "spec.rules", max_items=MAX_RULES)
            rules = tuple(_rule(v, f"spec.rules[{i}]", i, dialect) for i, v in enumerate(items))
    return Policy(
        ref=PolicyRef(name=name, namespace=namespace, file=file, document=document, line=line),
        action=action,
        selector=selector,
        rules=rules,
        dialect="istio" if istio else "meshca",
    )
