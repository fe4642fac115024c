"""Typed configuration for every stage: pydantic v2 schemas, YAML files, dotted overrides.

A config is loaded with ``load_config(Schema, path, ["train.lr=3e-4", ...])``. Every
problem is collected and reported at once, each naming the field, the value given and
what is allowed. Stages register their schema in ``STAGES`` so that
``homeforge config show STAGE`` can print the defaults with their descriptions.
"""


from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from homeforge import paths
from homeforge.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())



def encrypt_field(what: str):
    """The ``encrypt`` field every stage has: on by $HOMEFORGE_ENCRYPT, needs a data key."""
    return Field(default_factory=paths.encrypt_default,
                 description=f"encrypt {what} at rest (needs a data key: `homeforge keys init`; "
                             "default: $HOMEFORGE_ENCRYPT)")


# stage name -> schema, for `homeforge config show`; filled in homeforge.config
STAGES: dict[str, type[Section]] = {}


def register_stage(name: str, schema: type[Section]) -> None:
    """Make a stage's schema known to `homeforge config show`."""
    STAGES[name] = schema


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> tuple[dict, list[str]]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML."""
    data: dict = {}
    problems: list[str] = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: expected KEY.SUB=VALUE, e.g. train.optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key, value)
    return data, problems


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dotted keys, as overrides name them; an empty mapping is a value)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for unknown-key messages)."""
    model: Any = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}).keys())


def format_validation_error(schema: type[BaseModel], err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        field = ".".join(loc) or "(root)"
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc)
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg = f"{field}: unknown key (given {given!r})"
            if hint:
                msg += f"; did you mean {hint[0]!r}?"
            if allowed:
                msg += f" allowed here: {', '.join(allowed)}"
            problems.append(msg)
        else:
            problems.append(f"{field}: {e['msg']} (given {given!r})")
    return problems


def load_config(
    schema: type[Section],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    updates: dict[str, Any] | None = None,
) -> Any:
    """Load ``schema``: its defaults, then ``base``, the YAML file at ``path``, ``overrides``
    (``KEY.SUB=VALUE`` strings, values parsed as YAML), then ``updates`` (``{"key.sub": value}``
    from typed command-line flags: taken as they are, never parsed; ``None`` values are skipped).

    Raises ConfigError listing every problem (file, key and value errors) at once.
    """
    try:  # defaults first, so every layer refines them
        data: dict = schema().model_dump(mode="json")
    except ValidationError:  # a schema with required fields has no complete default
        data = {}
    if base:
        data = deep_merge(data, base)
    where = None
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist"], where=where)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"YAML syntax error: {exc}"], where=where) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of keys, got {type(loaded).__name__}"], where=where)
        data = deep_merge(data, loaded)
    extra, problems = parse_overrides(overrides)
    data = deep_merge(data, extra)
    typed: dict = {}
    for key, value in (updates or {}).items():
        if value is not None:
            _set_dotted(typed, key, str(value) if isinstance(value, Path) else value)
    data = deep_merge(data, typed)
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_error(schema, exc)
        cfg = None
    if problems:
        raise ConfigError(problems, where=where)
    return cfg


def describe(schema: type[BaseModel]) -> list[tuple[str, str, str]]:
    """Flatten a schema into (dotted key, default, description) rows, defaults included."""
    return _describe_instance(schema(), "")


def _describe_instance(instance: BaseModel, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, field in type(instance).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows.append((key, "", field.description or (type(value).__doc__ or "").strip().splitlines()[0]))
            rows += _describe_instance(value, key + ".")
        else:
            rows.append((key, repr(value), field.description or ""))
    return rows


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
