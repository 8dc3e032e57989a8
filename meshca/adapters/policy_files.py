"""Policy files: ``*.yaml`` under a directory -> a compiled ``PolicySet``, or every problem.

YAML is read defensively: anchors and aliases (and so alias bombs and merge keys),
duplicate keys, tags other than plain scalars, nesting deeper than ``MAX_DEPTH`` and
files over ``MAX_FILE_BYTES`` are refused, each with its file, document and line. Every
document is checked by ``meshca.core.policy.schema``; its complaints get the line of the
field they name.

The directory is walked recursively in name order; names starting with ``.`` are skipped
(Kubernetes mounts a ConfigMap as ``..data`` symlinks beside the files). The set's version
is a hash of every file's relative path and content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshca.core.errors import InvalidPolicy
from meshca.core.policy import PolicyFieldError, PolicyProblem, PolicySet, parse_policy
from meshca.core.policy.model import Policy
from meshca.core.policy.schema import ISTIO_ROOT_NAMESPACE

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "DirectoryPolicySource",
    "PolicyFiles",
    "YamlDocument",
    "compile_policy_files",
    "load_policy_dir",
    "read_policy_files",
    "read_yaml_documents",
]

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 64 * 1024 * 1024
MAX_FILES = 10_000
MAX_DEPTH = 32
MAX_DOCUMENTS = 20_000
SUFFIXES = (".yaml", ".yml")

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class _Refused(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def _line(node_or_event: Any) -> int | None:
    mark = getattr(node_or_event, "start_mark", None)
    return None if mark is None else int(mark.line) + 1


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """One document of a file: its value, its 1-based position, and the line of each field.

    ``lines`` maps field paths written as the schema writes them
    (``spec.rules[0].from[1].source``) to 1-based line numbers.
    """

    value: object
    index: int
    line: int
    lines: dict[str, int]

    def line_of(self, field: str) -> int:
        """The line of ``field``, or of the nearest enclosing field that was written."""
        path = field
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.line


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _invalid(name: str, index: int, line: int | None, message: str) -> InvalidPolicy:
    return InvalidPolicy([PolicyProblem(name, index or None, line, "", message)])


class _Frame:
    """A mapping or sequence being built, with where it sits and what comes next."""

    __slots__ = ("key", "path", "value")

    def __init__(self, value: dict[str, object] | list[object], path: str) -> None:
        self.value = value
        self.path = path
        #: For a mapping: the key whose value comes next, or None when a key comes next.
        self.key: str | None = None


class _Builder:
    """Builds plain values from parser events, iteratively (no recursion, so no depth
    a hostile file can use against the interpreter), refusing what policies never need."""

    def __init__(self) -> None:
        self._resolver = yaml.resolver.Resolver()
        self._constructor = yaml.constructor.SafeConstructor()
        self.stack: list[_Frame] = []
        self.lines: dict[str, int] = {}
        self.root: object = None

    def _child_path(self) -> str:
        if not self.stack:
            return ""
        frame = self.stack[-1]
        if isinstance(frame.value, list):
            return f"{frame.path}[{len(frame.value)}]"
        assert frame.key is not None
        return _join(frame.path, frame.key)

    def _place(self, value: object) -> None:
        if not self.stack:
            self.root = value
            return
        frame = self.stack[-1]
        if isinstance(frame.value, list):
            frame.value.append(value)
        else:
            assert frame.key is not None
            frame.value[frame.key] = value
            frame.key = None

    def _expecting_key(self) -> bool:
        return (
            bool(self.stack)
            and isinstance(self.stack[-1].value, dict)
            and (self.stack[-1].key is None)
        )

    def _scalar(self, event: yaml.ScalarEvent) -> object:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._resolver.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, event.value, event.implicit
            )
        where = self.stack[-1].path if self.stack else ""
        if tag not in _PLAIN_TAGS:
            raise _Refused(
                f"{where or 'document'}: YAML type {tag!r} is not allowed (quote the value)",
                _line(event),
            )
        node = yaml.ScalarNode(tag, event.value, None, None, event.style)
        return self._constructor.construct_object(node)

    def feed(self, event: yaml.Event) -> None:
        line = _line(event)
        if isinstance(event, yaml.AliasEvent):
            raise _Refused("YAML aliases (*name) are not allowed in policy files", line)
        if getattr(event, "anchor", None) is not None:
            raise _Refused("YAML anchors (&name) are not allowed in policy files", line)
        if isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            self._place(self.stack.pop().value)
            return
        if self._expecting_key():
            frame = self.stack[-1]
            where = frame.path or "document"
            if not isinstance(event, yaml.ScalarEvent):
                raise _Refused(f"{where}: mapping keys must be plain text", line)
            key = self._scalar(event)
            if not isinstance(key, str):
                raise _Refused(f"{where}: mapping keys must be plain text", line)
            assert isinstance(frame.value, dict)
            if key in frame.value:
                first = self.lines.get(_join(frame.path, key))
                raise _Refused(
                    f"{_join(frame.path, key)}: duplicate key (first at line {first})", line
                )
            frame.key = key
            self.lines[_join(frame.path, key)] = line or 0
            return
        if isinstance(event, yaml.ScalarEvent):
            self.lines.setdefault(self._child_path(), line or 0)
            self._place(self._scalar(event))
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            mapping = isinstance(event, yaml.MappingStartEvent)
            allowed_tag = _MAP_TAG if mapping else _SEQ_TAG
            path = self._child_path()
            if event.tag not in (None, "!", allowed_tag):
                raise _Refused(f"{path or 'document'}: YAML tag {event.tag!r} is not allowed", line)
            if len(self.stack) >= MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", line)
            self.lines.setdefault(path, line or 0)
            self.stack.append(_Frame({} if mapping else [], path))


# libyaml's parser (C) when present: the same events, many times faster.
_EVENT_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml_documents(text: str, name: str) -> Iterator[YamlDocument]:
    """Each non-empty document of ``text``; raises ``InvalidPolicy`` at the first problem."""
    index = 0
    builder = _Builder()
    start_line = 1
    try:
        for event in yaml.parse(text, Loader=_EVENT_LOADER):
            if isinstance(event, yaml.DocumentStartEvent):
                index += 1
                if index > MAX_DOCUMENTS:
                    raise _Refused(f"more than {MAX_DOCUMENTS} documents", _line(event))
                builder = _Builder()
                start_line = 0
            elif isinstance(event, yaml.DocumentEndEvent):
                if builder.root is not None:
                    line = start_line or builder.lines.get("", 1)
                    yield YamlDocument(builder.root, index, line, builder.lines)
            elif not isinstance(event, yaml.StreamStartEvent | yaml.StreamEndEvent):
                if not start_line and not builder.stack:
                    start_line = _line(event) or 1
                builder.feed(event)
    except _Refused as exc:
        raise _invalid(name, index, exc.line, exc.message) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = int(mark.line) + 1 if mark is not None else None
        raise _invalid(
            name, index, where, f"not valid YAML: {exc.problem or exc.context}"
        ) from None
    except yaml.YAMLError as exc:
        raise _invalid(name, index, None, f"not valid YAML: {exc}") from None


@dataclass(frozen=True, slots=True)
class PolicyFiles:
    """The policy files of a directory as read at one moment, and their content version."""

    directory: str
    files: tuple[tuple[str, bytes], ...]
    version: str
    problems: tuple[PolicyProblem, ...] = ()


def _walk(directory: Path) -> list[Path]:
    found = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found += _walk(entry)
        elif entry.name.endswith(SUFFIXES) and entry.is_file():
            found.append(entry)
    return found


def read_policy_files(directory: Path) -> PolicyFiles:
    """Read every policy file under ``directory``; unreadable ones become ``problems``.

    The version hashes each file's relative path and bytes, so any edit, rename, addition
    or removal gives a new version.
    """
    problems: list[PolicyProblem] = []
    files: list[tuple[str, bytes]] = []
    if not directory.is_dir():
        problems.append(PolicyProblem(str(directory), None, None, "", "not a directory"))
        paths: list[Path] = []
    else:
        try:
            paths = _walk(directory)
        except OSError as exc:
            problems.append(PolicyProblem(str(directory), None, None, "", str(exc.strerror or exc)))
            paths = []
    if len(paths) > MAX_FILES:
        problems.append(
            PolicyProblem(str(directory), None, None, "", f"more than {MAX_FILES} policy files")
        )
        paths = []
    total = 0
    for path in paths:
        name = path.relative_to(directory).as_posix()
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                problems.append(
                    PolicyProblem(name, None, None, "", f"larger than {MAX_FILE_BYTES} bytes")
                )
                continue
            data = path.read_bytes()[: MAX_FILE_BYTES + 1]
        except OSError as exc:
            problems.append(PolicyProblem(name, None, None, "", f"cannot read: {exc.strerror}"))
            continue
        if len(data) > MAX_FILE_BYTES:
            problems.append(
                PolicyProblem(name, None, None, "", f"larger than {MAX_FILE_BYTES} bytes")
            )
            continue
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            problems.append(
                PolicyProblem(name, None, None, "", f"policy files exceed {MAX_TOTAL_BYTES} bytes")
            )
            break
        files.append((name, data))
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(len(name).to_bytes(8, "big") + name.encode())
        digest.update(len(data).to_bytes(8, "big") + data)
    for problem in problems:
        digest.update(str(problem).encode())
    return PolicyFiles(str(directory), tuple(files), digest.hexdigest()[:16], tuple(problems))


def _policies_of(
    name: str, data: bytes, root_namespace: str, problems: list[PolicyProblem]
) -> list[Policy]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(PolicyProblem(name, None, None, "", f"not UTF-8 text ({exc.reason})"))
        return []
    policies = []
    try:
        for document in read_yaml_documents(text, name):
            try:
                policies.append(
                    parse_policy(
                        document.value,
                        file=name,
                        document=document.index,
                        line=document.line,
                        istio_root_namespace=root_namespace,
                    )
                )
            except PolicyFieldError as exc:
                problems.append(
                    PolicyProblem(
                        name, document.index, document.line_of(exc.field), exc.field, exc.message
                    )
                )
    except InvalidPolicy as exc:
        problems.extend(p for p in exc.problems if isinstance(p, PolicyProblem))
    return policies


def compile_policy_files(
    files: PolicyFiles, *, istio_root_namespace: str = ISTIO_ROOT_NAMESPACE
) -> PolicySet:
    """Every document of ``files`` -> one ``PolicySet``; raises ``InvalidPolicy`` with all
    problems if any document (or file) is bad. Two policies with one name are a problem."""
    problems = list(files.problems)
    policies: list[Policy] = []
    for name, data in files.files:
        policies += _policies_of(name, data, istio_root_namespace, problems)
    seen: dict[str, Policy] = {}
    for policy in policies:
        key = policy.ref.key
        if key in seen:
            first = seen[key].ref
            problems.append(
                PolicyProblem(
                    policy.ref.file,
                    policy.ref.document,
                    policy.ref.line,
                    "metadata.name",
                    f"a policy named {key!r} is already defined in {first.file} "
                    f"(document {first.document}, line {first.line})",
                )
            )
        else:
            seen[key] = policy
    if problems:
        raise InvalidPolicy(problems)
    return PolicySet(policies, files.version)


def load_policy_dir(
    directory: Path, *, istio_root_namespace: str = ISTIO_ROOT_NAMESPACE
) -> PolicySet:
    """``read_policy_files`` then ``compile_policy_files``."""
    return compile_policy_files(
        read_policy_files(directory), istio_root_namespace=istio_root_namespace
    )


def problems_text(problems: Sequence[object]) -> str:
    """One problem per line, for terminals and logs."""
    return "\n".join(str(p) for p in problems)


class DirectoryPolicySource:
    """``PolicySource`` over a directory of policy files (read anew on every call)."""

    def __init__(
        self, directory: Path, *, istio_root_namespace: str = ISTIO_ROOT_NAMESPACE
    ) -> None:
        self._directory = directory
        self._root = istio_root_namespace

    def version(self) -> str:
        return read_policy_files(self._directory).version

    def load(self) -> PolicySet:
        return load_policy_dir(self._directory, istio_root_namespace=self._root)
