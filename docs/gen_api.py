"""Generate docs/api.md, the API reference, from the public API's signatures and docstrings.

Run from the repository root::

    .venv/bin/python docs/gen_api.py > docs/api.md

tests/test_api_reference.py fails when docs/api.md differs from what this prints, so the
reference cannot drift from the code. What it covers: every name in ``ondevice.__all__``
(classes with their public methods, properties and fields, functions, the exception
tree), ``ondevice.sample``, and the parts of ``ondevice_sync`` an app uses (its
transports, the gateway key configuration and its exception tree). Names of
``ondevice.__all__`` that no section below places are listed under "Other names", so a
new export is never left out.

Signatures come from :func:`inspect.signature` with the annotations as written (every
module uses ``from __future__ import annotations``); docstrings from
:func:`inspect.getdoc`, converted from reStructuredText conventions to Markdown
(roles and double backquotes become code spans, linked when the name is documented
here; ``::`` blocks become fenced text blocks; definition lists become bullet lists).
Module-level constants and aliases are documented by a ``#:`` comment above them or a
string literal below them, as Sphinx reads them. The output depends on nothing but the
code: no addresses, no paths of this machine, no dates.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

REGENERATE = ".venv/bin/python docs/gen_api.py > docs/api.md"
WIDTH = 88

# ---------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Section:
    """One ``##`` section: a title, a few words of introduction and the names it holds,
    each ``module:name`` (the first module is where the reader imports it from)."""

    title: str
    intro: str
    names: tuple[str, ...]
    errors_root: str | None = None  # draw the exception tree rooted here first
    qualified: bool = False  # headings carry the module (ondevice_sync names)
    module_doc: str | None = None  # render this module's docstring as the intro


def _exceptions(module_name: str) -> tuple[str, ...]:
    """Every exception class ``module_name`` exports, in the order they are defined."""
    module = importlib.import_module(module_name)
    found = [getattr(module, n) for n in module.__all__]
    classes = [c for c in found if inspect.isclass(c) and issubclass(c, BaseException)]
    classes.sort(key=lambda c: (c.__module__, inspect.getsourcelines(c)[1]))
    return tuple(f"{module_name}:{c.__name__}" for c in classes)


SECTIONS: tuple[Section, ...] = (
    Section(
        "The engine",
        "Everything an app does goes through one `PersonalizationEngine` per profile "
        "directory: `from ondevice import PersonalizationEngine`. Recording, "
        "recommending, transparency (report, export, import), forgetting, keys and "
        "reporting are its methods.",
        ("ondevice:PersonalizationEngine",),
    ),
    Section(
        "Results and reports",
        "What the engine's methods return: ranked recommendations with their "
        "explanations, and the answer to \"what do you know about me, and why?\".",
        (
            "ondevice:Recommendations",
            "ondevice:Recommendation",
            "ondevice:ProfileReport",
            "ondevice:UserReport",
        ),
    ),
    Section(
        "Declarations and privacy levels",
        "What the app declares before anything is stored (every signal and context "
        "field with its type, purpose and retention), the shape of an interaction, and "
        "the five privacy levels.",
        (
            "ondevice:Policy",
            "ondevice:Signal",
            "ondevice:ContextField",
            "ondevice:Interaction",
            "ondevice:FieldPurpose",
            "ondevice:PrivacyLevel",
        ),
    ),
    Section(
        "Keys",
        "Where the profile's 256-bit data key comes from: the OS keychain (the "
        "default), a passphrase, or raw bytes the app keeps. `profile_key_provider` "
        "tells an app which one an existing profile needs before it opens it.",
        (
            "ondevice:Keychain",
            "ondevice:Passphrase",
            "ondevice:RawKey",
            "ondevice:Argon2Params",
            "ondevice:KeyProvider",
            "ondevice.keys:KeyProviderKind",
            "ondevice:profile_key_provider",
        ),
    ),
    Section(
        "Reporting settings and outcomes",
        "Reporting is opt-in: an engine without `SyncSettings` never uses the network. "
        "With them, `PersonalizationEngine.sync` and `sync_due` report one randomized "
        "segment ID per local user and week, and return a `SyncOutcome` each.",
        ("ondevice:SyncSettings", "ondevice:SyncOutcome"),
    ),
    Section(
        "Errors",
        "Every error `ondevice` raises on purpose derives from `OndeviceError`, so one "
        "`except OndeviceError` catches the family. Errors of the database driver, of "
        "`cryptography` and of `keyring` never reach the caller raw: they are chained "
        "as `__cause__`. The tree:",
        _exceptions("ondevice"),
        errors_root="OndeviceError",
    ),
    Section(
        "The sample catalog: ondevice.sample",
        "",
        (
            "ondevice.sample:sample_policy",
            "ondevice.sample:daypart",
            "ondevice.sample:SAMPLE_BUNDLE",
            "ondevice.sample:SAMPLE_PUBLIC_KEY",
            "ondevice.sample:PLANS",
            "ondevice.sample:DAYPARTS",
        ),
        module_doc="ondevice.sample",
    ),
    Section(
        "ondevice_sync: transports",
        "`SyncSettings(transport=...)` takes any object with the `Transport` method "
        "`request`. `None` (the default) means plain HTTP(S) to `server_url` through "
        "`HttpTransport`; `OhttpTransport` sends every request through an Oblivious "
        "HTTP relay, so that the server never sees the device's address. "
        "`ondevice_sync` is the import name of the repository folder `sync/`.",
        (
            "ondevice_sync.client:Transport",
            "ondevice_sync.client:Response",
            "ondevice_sync.client:HttpTransport",
            "ondevice_sync.ohttp:OhttpTransport",
        ),
        qualified=True,
    ),
    Section(
        "ondevice_sync: the gateway's key configuration",
        "`OhttpTransport` encrypts to the gateway's key configuration, which the app "
        "pins by its SHA-256 digest (as it pins the bundle's signing key). The operator "
        "prints both with `python -m ondevice_sync.gateway generate-key`.",
        (
            "ondevice_sync.ohttp:KeyConfig",
            "ondevice_sync.ohttp:key_config_digest",
            "ondevice_sync.ohttp:fetch_key_config",
        ),
        qualified=True,
    ),
    Section(
        "ondevice_sync: errors",
        "The engine never lets these reach the app from `sync()` or `fetch_featured()`: "
        "it raises `ondevice.SyncError` with the original chained as `__cause__` (or "
        "reports a failed send in the `SyncOutcome`). An app meets them when it uses a "
        "transport or `fetch_key_config` directly. Every class has a `retryable` flag "
        "(true only for `TransportError`, `ResponseDecryptionError` and "
        "`ServerUnavailableError`: a later retry of the same report can fix them); "
        "protocol and Oblivious HTTP errors carry a short machine-readable `code`. "
        "The tree:",
        _exceptions("ondevice_sync.errors"),
        errors_root="SyncError",
        qualified=True,
    ),
)

# ---------------------------------------------------------------------------- anchors


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@dataclass(frozen=True)
class Entry:
    """One documented name."""

    module: str
    name: str
    obj: Any
    heading: str  # the heading text (without the #s and backquotes)


def _entries(section: Section) -> list[Entry]:
    out = []
    for spec in section.names:
        module_name, name = spec.split(":")
        obj = getattr(importlib.import_module(module_name), name)
        heading = f"{module_name}.{name}" if section.qualified else name
        out.append(Entry(module_name, name, obj, heading))
    return out


def all_sections() -> list[Section]:
    """:data:`SECTIONS`, plus "Other names" for anything in ``ondevice.__all__`` that no
    section places."""
    ondevice = importlib.import_module("ondevice")
    placed = {s.split(":")[1] for sec in SECTIONS for s in sec.names if s.startswith("ondevice:")}
    missing = tuple(f"ondevice:{n}" for n in sorted(ondevice.__all__) if n not in placed)
    if not missing:
        return list(SECTIONS)
    other = Section("Other names", "Exported by `ondevice` and not grouped above.", missing)
    return [*SECTIONS, other]


# ---------------------------------------------------------------------------- docstrings


def _module_source(module_name: str) -> ast.Module:
    module = importlib.import_module(module_name)
    return ast.parse(inspect.getsource(module))


def _defining_module(module_name: str, name: str) -> str:
    """The module whose source assigns ``name``: ``module_name`` itself, or the module a
    package's ``from .x import name`` names."""
    module = importlib.import_module(module_name)
    package = module_name if hasattr(module, "__path__") else module_name.rpartition(".")[0]
    for node in _module_source(module_name).body:
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            if not node.level:
                return str(node.module)
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            return f"{base}.{node.module}" if node.module else base
    return module_name


def _assignment_doc(body: Sequence[ast.stmt], source: str, name: str) -> str | None:
    """The ``#:`` comment above an assignment of ``name`` in ``body``, or the string
    literal right after it."""
    lines = source.splitlines()
    for i, node in enumerate(body):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        if i + 1 < len(body):
            after = body[i + 1]
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return inspect.cleandoc(after.value.value)
        comment: list[str] = []
        n = node.lineno - 2
        while n >= 0 and lines[n].strip().startswith("#:"):
            comment.insert(0, lines[n].strip()[2:].strip())
            n -= 1
        return " ".join(comment) or None
    return None


def _data_node(module_name: str, name: str) -> tuple[ast.Assign | ast.AnnAssign, str] | None:
    source = inspect.getsource(importlib.import_module(module_name))
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node, source
    return None


def doc_of(module_name: str, name: str) -> str:
    """The documentation of ``module_name.name``: the docstring of a class or function
    (:func:`inspect.getdoc`), or the ``#:`` comment / string literal of a constant or
    alias in the module that defines it. Empty if there is none."""
    obj = getattr(importlib.import_module(module_name), name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return inspect.getdoc(obj) or ""
    home = _defining_module(module_name, name)
    source = inspect.getsource(importlib.import_module(home))
    return _assignment_doc(ast.parse(source).body, source, name) or ""


def _class_attribute_docs(cls: type) -> dict[str, str]:
    """``#:`` comments (or following string literals) of the class body's assignments."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs = {}
    for stmt in node.body:
        targets: list[ast.expr] = []
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign):
            targets = [stmt.target]
        for t in targets:
            if isinstance(t, ast.Name):
                found = _assignment_doc(node.body, source, t.id)
                if found:
                    docs[t.id] = found
    return docs


# ---------------------------------------------------------------- reST to Markdown

_ROLE = re.compile(r":(?:class|meth|func|data|mod|attr|exc|obj):`(~?)([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.S)
_UNDERLINE = re.compile(r"^([-=~^])\1{2,}$")


class Linker:
    """Turns a dotted name into a Markdown code span, linked when it is documented here."""

    def __init__(self, anchors: dict[str, str]) -> None:
        self.anchors = anchors

    def resolve(self, target: str, context: str | None) -> str | None:
        name = target.rstrip("()")
        candidates = [name]
        for prefix in ("ondevice_sync.", "ondevice."):
            if name.startswith(prefix):
                rest = name[len(prefix) :]
                candidates.append(rest)
                candidates.append(rest.split(".", 1)[1] if "." in rest else rest)
        if context is not None and "." not in name:
            candidates.insert(0, f"{context}.{name}")
        for candidate in candidates:
            if candidate in self.anchors:
                return self.anchors[candidate]
        return None

    def code(self, target: str, shown: str, context: str | None) -> str:
        anchor = self.resolve(target, context)
        return f"[`{shown}`](#{anchor})" if anchor else f"`{shown}`"


def _inline(text: str, linker: Linker, context: str | None) -> str:
    def role(match: re.Match[str]) -> str:
        tilde, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        return linker.code(target, shown, context)

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(lambda m: f"`{m.group(1)}`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def markdown(doc: str, linker: Linker, context: str | None = None) -> str:
    """A docstring written with reST conventions, as Markdown."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        # A literal block: "text::" or a lone "::", then an indented block.
        if stripped.endswith("::"):
            base = _indent(line)
            lead = stripped[:-2].rstrip()
            if lead:
                out.append(" " * base + _inline(lead, linker, context) + ":")
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            body = [b for b in block if b.strip()]
            cut = min((_indent(b) for b in body), default=0)
            if out and out[-1].strip():
                out.append("")
            out.append("```text")
            out.extend(b[cut:] for b in block)
            out.extend(("```", ""))
            i = j
            continue
        # A section title underlined with -, = or ~.
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if stripped and _UNDERLINE.match(nxt) and len(nxt) == len(stripped):
            out.append(f"**{_inline(stripped, linker, context)}**")
            i += 2
            continue
        # A definition list item: a term, then its definition indented by four.
        if (
            stripped
            and not stripped.startswith(("- ", "* "))
            and i + 1 < len(lines)
            and lines[i + 1].strip()
            and _indent(lines[i + 1]) == _indent(line) + 4
        ):
            base = _indent(line)
            j = i + 1
            text: list[str] = []
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) >= base + 4:
                text.append(lines[j].strip())
                j += 1
            term = _inline(stripped, linker, context)
            definition = _inline(" ".join(text), linker, context)
            out.append(" " * base + f"- {term}: {definition}")
            i = j
            continue
        out.append(_inline(line, linker, context))
        i += 1
    return "\n".join(out).strip("\n")


# ---------------------------------------------------------------------------- signatures


class _Shown:
    """Stands in for a default or an annotation so that ``str(signature)`` shows text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _default_text(value: Any, factory: Any = None) -> str:
    if factory is not None:
        if factory in (dict, list, tuple, set, frozenset):
            return {dict: "{}", list: "[]", tuple: "()", set: "set()", frozenset: "frozenset()"}[
                factory
            ]
        return f"{factory.__qualname__}()"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if inspect.isroutine(value) or inspect.isclass(value):
        module = getattr(value, "__module__", None) or ""
        return f"{module}.{value.__qualname__}" if module != "builtins" else value.__qualname__
    text = repr(value)
    if " at 0x" in text or re.search(r"<[^>]*object", text):
        raise ValueError(f"the default {text} would not render the same on every run")
    return text


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def signature(obj: Any, *, drop_first: bool = False) -> inspect.Signature | None:
    """``obj``'s signature with annotations as written and defaults as readable text
    (a function as its dotted name, an enum member as ``Enum.NAME``, a dataclass
    ``default_factory`` as the value it makes); None if it has none."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    factories: dict[str, Any] = {}
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.default_factory is not dataclasses.MISSING:
                factories[f.name] = f.default_factory
    params = []
    for n, p in enumerate(sig.parameters.values()):
        if drop_first and n == 0:
            continue
        changes: dict[str, Any] = {}
        if p.default is not inspect.Parameter.empty:
            changes["default"] = _Shown(_default_text(p.default, factories.get(p.name)))
        if p.annotation is not inspect.Parameter.empty:
            changes["annotation"] = _Shown(_annotation_text(p.annotation))
        params.append(p.replace(**changes))
    ret = sig.return_annotation
    if ret is not inspect.Signature.empty:
        ret = _Shown(_annotation_text(ret))
    return sig.replace(parameters=params, return_annotation=ret)


def _param_texts(sig: inspect.Signature) -> list[str]:
    """The parameters as ``str(signature)`` shows them, with the ``/`` and ``*``
    markers as their own items."""
    out: list[str] = []
    kinds = inspect.Parameter
    params = list(sig.parameters.values())
    for n, p in enumerate(params):
        before = params[n - 1].kind if n else None
        opens = before not in (kinds.KEYWORD_ONLY, kinds.VAR_POSITIONAL)
        if p.kind is kinds.KEYWORD_ONLY and opens:
            out.append("*")
        out.append(str(p))
        after = params[n + 1].kind if n + 1 < len(params) else None
        if p.kind is kinds.POSITIONAL_ONLY and after is not kinds.POSITIONAL_ONLY:
            out.append("/")
    return out


def format_call(prefix: str, sig: inspect.Signature | None, *, returns: bool = True) -> str:
    """``prefix(params) -> returns``, one parameter per line when it is long."""
    if sig is None:
        return prefix
    params = _param_texts(sig)
    ret = ""
    if returns and sig.return_annotation is not inspect.Signature.empty:
        ret = f" -> {sig.return_annotation!r}"
    one = f"{prefix}({', '.join(params)}){ret}"
    if len(one) <= WIDTH or not params:
        return one
    body = "".join(f"    {p},\n" for p in params)
    return f"{prefix}(\n{body}){ret}"


# ---------------------------------------------------------------------------- rendering


def _bases(cls: type) -> list[str]:
    shown = []
    for base in cls.__bases__:
        if base is object or base.__name__ in ("Protocol", "Generic", "ABC"):
            continue
        if base.__name__.startswith("_"):
            continue  # a private helper base: its public members are shown as the class's
        module = base.__module__
        if module == "builtins" or module.startswith(("ondevice", "ondevice_sync")):
            shown.append(base.__name__)
        elif module.startswith(("collections.abc", "_collections_abc")):
            shown.append(f"collections.abc.{base.__qualname__}")
        else:
            shown.append(f"{module}.{base.__qualname__}")
    return shown


def _is_exception(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def _is_protocol(cls: type) -> bool:
    return bool(getattr(cls, "_is_protocol", False))


def _fence(text: str) -> list[str]:
    return ["```text", text, "```"]


@dataclass
class Writer:
    """Collects the document's lines and its anchors."""

    linker: Linker
    lines: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def para(self, text: str) -> None:
        if text:
            self.add(text, "")

    def doc(self, text: str, context: str | None) -> None:
        self.para(markdown(text, self.linker, context) if text else "*No docstring.*")


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public members the class itself defines (or gets from a private helper base), in
    source order; dataclass fields and enum members are shown elsewhere."""
    owners = [b for b in reversed(cls.__mro__[1:]) if b.__name__.startswith("_")]
    seen: set[str] = set()
    for owner in [cls, *owners]:
        for name, raw in vars(owner).items():
            if name in seen:
                continue
            seen.add(name)
            yield from _public_member(cls, name, raw)


def _public_member(cls: type, name: str, raw: Any) -> Iterator[tuple[str, Any]]:
    if name.startswith("_") or type(raw).__name__ in ("member_descriptor", "getset_descriptor"):
        return
    if isinstance(cls, enum.EnumMeta) and name in cls.__members__:
        return
    yield name, raw


def _render_class(w: Writer, entry: Entry) -> None:
    cls = entry.obj
    bases = _bases(cls)
    head = f"class {entry.name}" + (f"({', '.join(bases)})" if bases else "")
    sig = None
    if not (_is_exception(cls) or _is_protocol(cls) or isinstance(cls, enum.EnumMeta)):
        sig = signature(cls)
    if sig is not None and sig.parameters:
        w.add(*_fence(format_call(f"class {entry.name}", sig, returns=False)))
        if bases:
            w.add("", f"Bases: {', '.join(f'`{b}`' for b in bases)}.")
    else:
        w.add(*_fence(head))
    w.add("")
    w.doc(inspect.getdoc(cls) or "", entry.name)
    traits = []
    if "__enter__" in vars(cls):
        traits.append("a context manager (`with ... as engine:` closes it)")
    if "__len__" in vars(cls) and "__getitem__" in vars(cls):
        traits.append("a sequence (`len()`, indexing, iteration)")
    if traits:
        w.para(f"`{entry.name}` is " + " and ".join(traits) + ".")
    if isinstance(cls, enum.EnumMeta):
        members = ", ".join(f"`{m.name}` = `{m.value!r}`" for m in cls)  # type: ignore[var-annotated]
        w.para(f"Members: {members}.")
    attribute_docs = _class_attribute_docs(cls)
    plain: list[str] = []
    for name, raw in _members(cls):
        if _has_heading(raw):
            continue
        note = attribute_docs.get(name)
        if note is not None:
            plain.append(f"- `{name} = {raw!r}`: {markdown(note, w.linker, entry.name)}")
        elif _is_exception(cls):
            plain.append(f"- `{name} = {raw!r}`")
        # else: an undocumented class-level value, an implementation detail
    if plain:
        w.add("Class attributes:", "", *plain, "")
    for name, raw in _members(cls):
        if _has_heading(raw):
            _render_member(w, entry, name, raw)


def _has_heading(raw: Any) -> bool:
    """Methods and properties get a heading of their own; class attributes do not."""
    return isinstance(raw, property | classmethod | staticmethod) or inspect.isfunction(raw)


def _render_member(w: Writer, entry: Entry, name: str, raw: Any) -> None:
    title = f"{entry.name}.{name}"
    if isinstance(raw, property):
        fget = raw.fget
        ret = inspect.signature(fget).return_annotation if fget is not None else None
        shown = f"property {name}" + (
            f" -> {_annotation_text(ret)}" if ret not in (None, inspect.Signature.empty) else ""
        )
        w.add(f"#### `{title}`", "", *_fence(shown), "")
        w.doc(inspect.getdoc(raw) or "", entry.name)
        return
    if isinstance(raw, classmethod | staticmethod):
        kind = "classmethod" if isinstance(raw, classmethod) else "staticmethod"
        func = raw.__func__
        sig = signature(func, drop_first=kind == "classmethod")
        w.add(f"#### `{title}`", "", *_fence(f"{kind} " + format_call(name, sig)), "")
        w.doc(inspect.getdoc(func) or "", entry.name)
        return
    sig = signature(raw, drop_first=True)
    w.add(f"#### `{title}`", "", *_fence(format_call(name, sig)), "")
    w.doc(inspect.getdoc(getattr(entry.obj, name)) or "", entry.name)


def _value_text(entry: Entry) -> str:
    value = entry.obj
    if isinstance(value, str | int | float | bool) or (
        isinstance(value, tuple) and all(isinstance(v, str | int | float) for v in value)
    ):
        return f"{entry.name} = {value!r}"
    if isinstance(value, bytes):
        return f"{entry.name}: bytes  # {len(value)} bytes"
    if isinstance(value, PurePath):
        return f"{entry.name}: pathlib.Path  # {value.name}, inside the installed package"
    found = _data_node(_defining_module(entry.module, entry.name), entry.name)
    if found is not None:
        node, source = found
        value_node = node.value
        if value_node is not None:
            return f"{entry.name} = {ast.get_source_segment(source, value_node)}"
    return f"{entry.name}: {type(value).__name__}"


def _render(w: Writer, entry: Entry) -> None:
    w.add(f"### `{entry.heading}`", "")
    if inspect.isclass(entry.obj):
        _render_class(w, entry)
    elif inspect.isroutine(entry.obj):
        w.add(*_fence(format_call(entry.name, signature(entry.obj))), "")
        w.doc(inspect.getdoc(entry.obj) or "", None)
    else:
        w.add(*_fence(_value_text(entry)), "")
        w.doc(doc_of(entry.module, entry.name), None)


def _tree(w: Writer, entries: list[Entry], root: str) -> None:
    """The exception tree as nested bullets, children in definition order."""
    by_class = {e.obj: e for e in entries if _is_exception(e.obj)}

    def order(cls: type) -> tuple[str, int]:
        """Definition order in the module that defines the class."""
        return cls.__module__, inspect.getsourcelines(cls)[1]

    def parent(cls: type) -> type | None:
        return next((b for b in cls.__bases__ if b in by_class), None)

    def walk(cls: type, depth: int) -> None:
        e = by_class[cls]
        others = [b for b in _bases(cls) if b not in {p.__name__ for p in by_class}]
        extra = f" ({', '.join(others)})" if others else ""
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        summary = _inline(summary, w.linker, None)
        w.add("  " * depth + f"- [`{cls.__name__}`](#{slug(e.heading)}){extra}: {summary}")
        children = sorted((c for c in by_class if parent(c) is cls), key=order)
        for child in children:
            walk(child, depth + 1)

    roots = [c for c in by_class if c.__name__ == root]
    if not roots:
        raise ValueError(f"no exception named {root} in its section")
    walk(roots[0], 0)
    unplaced = [c.__name__ for c in by_class if not _reaches(c, roots[0], parent)]
    if unplaced:
        raise ValueError(f"not under {root}: {unplaced}")
    w.add("")


def _reaches(cls: type, root: type, parent: Callable[[type], type | None]) -> bool:
    node: type | None = cls
    while node is not None:
        if node is root:
            return True
        node = parent(node)
    return False


def _anchors(sections: Iterable[Section]) -> dict[str, str]:
    """Every name a role may refer to, mapped to its heading's anchor."""
    anchors: dict[str, str] = {}
    seen: set[str] = set()

    def put(key: str, anchor: str) -> None:
        anchors.setdefault(key, anchor)

    def claim(anchor: str) -> str:
        if anchor in seen:  # GitHub would number the second one: links would go astray
            raise ValueError(f"two headings share the anchor #{anchor}")
        seen.add(anchor)
        return anchor

    for section in sections:
        claim(slug(section.title))
        for entry in _entries(section):
            anchor = claim(slug(entry.heading))
            put(entry.heading, anchor)
            put(f"{entry.module}.{entry.name}", anchor)
            if not section.qualified:
                put(entry.name, anchor)
            else:
                put(f"{entry.module.split('.', 1)[1]}.{entry.name}", anchor)
            if inspect.isclass(entry.obj):
                for name, raw in _members(entry.obj):
                    if not _has_heading(raw):
                        continue
                    member = claim(slug(f"{entry.name}.{name}"))
                    put(f"{entry.name}.{name}", member)
                    put(f"{entry.heading}.{name}", member)
    return anchors


def render() -> str:
    """The whole of docs/api.md."""
    sections = all_sections()
    linker = Linker(_anchors(sections))
    w = Writer(linker)
    w.add(
        "# API reference",
        "",
        "The public API of `ondevice` (the device SDK) and the parts of `ondevice_sync` an "
        "app uses, generated from the signatures and docstrings by `docs/gen_api.py`. "
        "Do not edit it by hand: change the docstrings and regenerate it with",
        "",
        *_fence(REGENERATE),
        "",
        "(`tests/test_api_reference.py` fails while it is out of step). The command line is "
        "in [cli.md](cli.md); what leaves the device, and why, in [privacy.md](privacy.md).",
        "",
        "## Contents",
        "",
    )
    for section in sections:
        w.add(f"- [{section.title}](#{slug(section.title)})")
        if section.errors_root is not None:
            continue  # the section opens with the tree, which links every class
        for entry in _entries(section):
            w.add(f"  - [`{entry.heading}`](#{slug(entry.heading)})")
    w.add("")
    for section in sections:
        w.add(f"## {section.title}", "")
        if section.module_doc is not None:
            module = importlib.import_module(section.module_doc)
            w.doc(inspect.getdoc(module) or "", None)
        w.para(markdown(section.intro, linker))
        entries = _entries(section)
        if section.errors_root is not None:
            _tree(w, entries, section.errors_root)
        for entry in entries:
            _render(w, entry)
    text = "\n".join(w.lines).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference (redirect it to docs/api.md)."""
    del argv
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
