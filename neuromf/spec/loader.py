"""Load a run-spec: YAML file -> `--set` overrides -> `${...}` references -> validation -> absolute paths.

Every problem is collected and reported as `dotted.field.path: message`, so a
user fixes them all in one go instead of one per run.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from neuromf.errors import UserError
from neuromf.spec.renamed import new_name
from neuromf.spec.schema import RunSpec

_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.S)


class SpecError(UserError):
    """One or more problems with a run-spec."""


# ---------------------------------------------------------------- reading


MAX_SPEC_BYTES = 1 << 20  # a run-spec is a few KB; anything near this is not one
MAX_SET_BYTES = 64 << 10  # one --set value
MAX_NODES = 100_000  # YAML nodes after expanding aliases (a "billion laughs" file expands to 10^9)
MAX_DEPTH = 32  # nesting of mappings/lists (a run-spec needs 4)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (instead of keeping the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                    )
                seen[key] = line
            except TypeError:
                pass  # an unhashable key: SafeLoader reports it below
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _check_size(root: yaml.Node) -> None:
    """Refuse alias bombs and deep nesting before anything is built from the node graph."""
    sizes: dict[int, int] = {}

    def walk(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _TooBig(node, f"nesting deeper than {MAX_DEPTH} levels")
        if id(node) in sizes:  # an alias: counted again in full, as if written out
            return sizes[id(node)]
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        total = 1
        for child in children:
            total += walk(child, depth + 1)
            if total > MAX_NODES:
                raise _TooBig(node, f"more than {MAX_NODES} values once aliases are expanded (an alias bomb?)")
        sizes[id(node)] = total
        return total

    walk(root, 0)


class _TooBig(Exception):
    def __init__(self, node: yaml.Node, what: str) -> None:
        super().__init__(f"line {node.start_mark.line + 1}: {what}")


def parse_yaml(text: str) -> Any:
    """Parse one YAML document safely: no duplicate keys, no alias bombs, bounded nesting.

    Raises yaml.YAMLError for syntax errors and duplicates (with a mark), _TooBig for the limits.
    """
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise _TooBig(
                yaml.ScalarNode("", "", loader.get_mark(), loader.get_mark()), f"nesting deeper than {MAX_DEPTH} levels"
            ) from None
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
    return f"{kind} at {where}: {problem}"


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a run-spec file into a mapping, with one clear line for each way that can fail."""
    if not path.exists():
        raise SpecError(f"{path}: no such file")
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, not a run-spec file")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {size} bytes; a run-spec is at most {MAX_SPEC_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: {_yaml_problem(e)}") from None
    except _TooBig as e:
        raise SpecError(f"{path}: {e}") from None
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a run-spec is a mapping of sections (model, training, ...)")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections at the top level, got a {type(raw).__name__}")
    return raw


# ---------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides; values are YAML (`[8,16]`, `2e-4`, `true`)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            problems.append(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. training.lr=2e-4")
            continue
        if len(text.encode("utf-8")) > MAX_SET_BYTES:
            problems.append(f"{key}: --set value of {len(text)} characters; at most {MAX_SET_BYTES}")
            continue
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"{key}: --set value is not valid YAML ({_yaml_problem(e)})")
            continue
        except _TooBig as e:
            problems.append(f"{key}: --set value: {e}")
            continue
        # YAML reads 1e-4 (no dot) as a string; users mean a number.
        if isinstance(value, str):
            try:
                value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
            except ValueError:
                pass
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(
                    f"{'.'.join(parts[: depth + 1])}: --set {key} goes through a value that is not a mapping"
                )
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise SpecError(*problems)
    return raw


# ---------------------------------------------------------------- references


def expand_references(raw: dict[str, Any]) -> dict[str, Any]:
    """Expand `${NAME}` (environment) and `${paths.KEY}` (the spec's own paths section) in strings."""
    problems: list[str] = []
    paths_section = raw.get("paths") if isinstance(raw.get("paths"), dict) else {}

    def lookup(name: str, where: str, stack: tuple[str, ...]) -> str | None:
        if name.startswith("paths."):
            key = name[len("paths.") :]
            if key in stack:
                problems.append(f"{where}: circular reference ${{paths.{key}}}")
                return None
            if key not in paths_section or paths_section[key] is None:
                problems.append(f"{where}: ${{{name}}} refers to paths.{key}, which is not set")
                return None
            return expand(str(paths_section[key]), f"paths.{key}", stack + (key,))
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            problems.append(f"{where}: ${{{name}}} is neither an environment variable nor paths.KEY")
            return None
        if name not in os.environ:
            problems.append(f"{where}: environment variable {name} (from ${{{name}}}) is not set")
            return None
        return os.environ[name]

    def expand(text: str, where: str, stack: tuple[str, ...] = ()) -> str:
        return _REFERENCE.sub(lambda m: lookup(m.group(1), where, stack) or m.group(0), text)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            stack = (where.split(".", 1)[1],) if where.startswith("paths.") else ()
            return expand(node, where, stack)
        return node

    expanded = walk(raw, "")
    if problems:
        raise SpecError(*dict.fromkeys(problems))
    return expanded


# ---------------------------------------------------------------- validation


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that a location points into (for 'did you mean')."""
    model: type[BaseModel] = RunSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(error: ValidationError) -> list[str]:
    """One `dotted.path: message` line per problem."""
    lines = []
    for e in error.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden" and new_name(loc):
            msg = f"renamed: use {new_name(loc)}"
        elif e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            msg = "unknown key"
            if parent is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1, cutoff=0.6)
                if close:
                    msg += f"; did you mean '{close[0]}'?"
                else:
                    msg += f"; expected one of: {', '.join(parent.model_fields)}"
        elif e["type"] == "model_type":
            msg = f"expected a mapping (key: value lines), got {type(e['input']).__name__} {e['input']!r}"
        else:
            m = _FIELD_PREFIX.match(msg)
            if m:  # validators name the field they complain about: "field: message"
                loc, msg = loc + tuple(m.group(1).split(".")), m.group(2)
                if len(loc) > 1 and loc[0] == loc[1]:
                    loc = loc[1:]
            if (
                e["type"] not in {"value_error", "assertion_error"}
                and "input" in e
                and not isinstance(e["input"], (dict, list))
            ):
                msg += f" (got {e['input']!r})"
        lines.append(f"{_dotted(loc) or 'run-spec'}: {msg}")
    return lines


def _resolve_paths(section: BaseModel, base_dir: Path) -> BaseModel:
    """Make every relative Path in the spec absolute, relative to the run-spec file's folder."""
    updates: dict[str, Any] = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base_dir)
        elif isinstance(value, Path):
            expanded = Path(os.path.expanduser(value))
            updates[name] = expanded if expanded.is_absolute() else Path(os.path.abspath(base_dir / expanded))
    return section.model_copy(update=updates)


def runspec_from_dict(raw: dict[str, Any], base_dir: Path, overrides: Iterable[str] = ()) -> RunSpec:
    """Validate a raw mapping as a run-spec; relative paths resolve against `base_dir`."""
    raw = expand_references(apply_overrides(raw, overrides))
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(*format_validation_error(e)) from None
    return _resolve_paths(spec, base_dir)  # type: ignore[return-value]


def load_runspec(path: str | Path, overrides: Iterable[str] = ()) -> RunSpec:
    """Read, override, expand, validate and resolve a run-spec file."""
    path = Path(path)
    return runspec_from_dict(read_yaml(path), path.resolve().parent, overrides)


def dump_runspec(spec: RunSpec) -> str:
    """The fully resolved spec as YAML (what `neuromf show` prints and checkpoints keep)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)
