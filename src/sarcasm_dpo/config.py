"""Typed settings for every stage, and the one way they are read: defaults < YAML file < flags.

Each stage's settings are a dataclass whose fields carry their own help text (litgpt style), so
`--help`, the YAML files in configs/ and the `config` saved beside every output all come from one
place. A YAML file may hold keys shared by all stages at the top level (`model`, `seed`,
`wandb_project`, ...) and one section per stage (`split:`, `sft:`, `mine:`, `dpo:`, `compare:`,
`export:`);
a stage takes the shared keys it knows plus its own section. Unknown keys are an error, so a typo
in a config never silently falls back to a default.

This module is the generic dataclass <-> argparse/YAML machinery: it knows no stage. Whoever reads
a config passes the sections it may hold as `classes` ({section: settings class}; the CLI and the
pipeline take them from the stage registry, `sarcasm_dpo.stages.settings_classes()`).

    sarcasm-dpo sft --config configs/smollm2-135m-cpu.yaml --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .errors import UserError

C = TypeVar("C")


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, alias: Sequence[str] = ()) -> Any:
    """A dataclass field with its help text (and optional choices / extra flag names)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "alias": tuple(alias)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for annotations like `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML or command-line value into the field's type, with an error that names the field."""
    inner, optional = _base_type(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and {int, str} <= set(typing.get_args(tp)):
        # `int | str` (e.g. --batch_size 8 or auto): a whole number when it reads as one, else the word
        text = str(value).strip()
        return int(text) if text.lstrip("+-").isdigit() else text
    if value is None:
        if optional:
            return None
        raise UserError(f"Setting '{name}' cannot be empty.")
    # A YAML mapping or list where one value belongs, or true/false where a number does, is a mistake in the
    # file, not something to turn into a folder named "{'a': 1}" or a sample of 1.
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and typing.get_origin(inner) is not list) \
            or (isinstance(value, bool) and inner in (int, float)):
        raise UserError(f"Setting '{name}' expects {getattr(inner, '__name__', inner)}, got {value!r}.")
    try:
        if typing.get_origin(inner) is list:
            (item_tp,) = typing.get_args(inner)
            if isinstance(value, str):  # "0.01,0.05" on the command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(v, item_tp, name) for v in value]
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if inner is float:
            number = float(value)
            if not math.isfinite(number):  # nan/inf pass float() but no setting means anything at them
                raise UserError(f"Setting '{name}' must be a finite number, got {value!r}.")
            return number
        if inner is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"Setting '{name}' expects {getattr(inner, '__name__', inner)}, got {value!r}.") from None
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are suppressed so we can tell what the user actually typed."""
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML settings file (see configs/); flags given here override it.")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        names = [f"--{f.name}", *meta.get("alias", ())]
        help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
        if tp is bool and default is False:
            parser.add_argument(*names, dest=f.name, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                      help=f"{help_text} (default: {shown})")
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if typing.get_origin(tp) is list and f.name in REPEATABLE:
            kwargs["action"] = "append"
        parser.add_argument(*names, **kwargs)


# List fields that are given by repeating the flag (`--extra_test a=x --extra_test b=y`)
# rather than as one comma-separated value.
REPEATABLE = {"extra_test", "set"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last copy, so a
    section written twice would silently lose every setting of its first copy."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping (the "
                                                        "later copy would replace the earlier)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    from .inputs import read_input_text

    path = Path(path)
    text = read_input_text(path, "Config file", allow_empty=True)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(f"Config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping of settings, found {type(data).__name__}.")
    return data


def _yaml_problem(exc: Exception) -> str:
    """The parser's complaint on one line, with where it was found (its own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "") + "."


def values_for_stage(data: dict, classes: dict[str, type], section: str, source: str = "config") -> dict:
    """The settings stage `section` (one of `classes`) takes from a YAML mapping: the shared top-level keys
    it knows plus its own section. A top-level key that names a section is that section, never a setting."""
    names = {f.name for f in dataclasses.fields(classes[section])}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in classes:
            continue
        if key in names:
            out[key] = value
    section_values = data.get(section) or {}
    if not isinstance(section_values, dict):
        raise UserError(f"{source}: section '{section}' must be a mapping of settings.")
    unknown = sorted(set(section_values) - names)
    if unknown:
        raise UserError(f"{source}: unknown setting(s) in section '{section}': {', '.join(unknown)}. "
                        f"Known: {', '.join(sorted(names))}.")
    out.update(section_values)
    return out


def check_known_keys(data: dict, classes: dict[str, type], source: str = "config") -> None:
    """Every top-level key must be a stage section or a setting of at least one stage."""
    all_names = {f.name for cls in classes.values() for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in classes and k not in all_names)
    if unknown:
        raise UserError(f"{source}: unknown setting(s): {', '.join(unknown)}.")
    for section in classes:
        values_for_stage(data, classes, section, source)


def apply_overrides(data: dict, overrides: Sequence[str], classes: dict[str, type]) -> dict:
    """A copy of a YAML mapping with `SECTION.KEY=VALUE` (or shared `KEY=VALUE`) items set, as the file would.
    `classes`: the sections that may be set ({section: settings class}).

    The value is read as YAML (`64`, `1e-4`, `true`, `[q_proj, v_proj]`), then typed and checked
    like any config value when the stage's settings are built. Unknown sections and keys are errors.

        sarcasm-dpo pipeline --config configs/smoke.yaml --set sft.sample_size=64 --set seed=1
    """
    import copy

    out = copy.deepcopy(data)
    sections = classes
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().rpartition(".")
        if not sep or not name or (dot and not section):
            raise UserError(f"--set expects SECTION.KEY=VALUE or KEY=VALUE (e.g. sft.sample_size=64), got {item!r}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if section:
            if section not in sections:
                raise UserError(f"--set {item}: unknown section {section!r}; sections: {', '.join(sections)} "
                                "(the pipeline's own settings are flags: --data_dir, --mine, ...).")
            known = {f.name for f in dataclasses.fields(sections[section])}
            if name not in known:
                raise UserError(f"--set {item}: section {section!r} has no setting {name!r}. "
                                f"Known: {', '.join(sorted(known))}.")
            if not isinstance(out.get(section), dict):
                out[section] = {}
            out[section][name] = value
        else:
            known = {f.name for cls in sections.values() for f in dataclasses.fields(cls)}
            if name not in known:
                raise UserError(f"--set {item}: no stage has a setting {name!r}; use SECTION.KEY=VALUE for one "
                                f"stage's setting (sections: {', '.join(sections)}).")
            out[name] = value
    return out


def build(cls: type[C], values: dict) -> C:
    """Instantiate a settings dataclass from raw values, coercing types; then run its checks."""
    hints = _hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"Unknown setting '{key}' for {cls.__name__}.")
        kwargs[key] = _coerce(value, hints[key], key)
    # The flags' choices hold for a config file's values too (argparse checks only the command line).
    for f in dataclasses.fields(cls):
        value = kwargs.get(f.name)
        # Where a run writes: an empty name would be the current folder, whose files --overwrite replaces.
        if f.name.startswith("output_") and isinstance(value, str) and not value.strip():
            raise UserError(f"{f.name} is empty: name the folder or file this run writes.")
        # Every library that takes the seed (numpy, torch, scikit-learn) wants 0 .. 2**32 - 1.
        if f.name == "seed" and value is not None and not 0 <= value < 2**32:
            raise UserError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {value}.")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}.")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def from_namespace(classes: dict[str, type], ns: argparse.Namespace, section: str) -> Any:
    """Settings of stage `section` (one of `classes`, every section a config file may hold) from parsed
    flags: dataclass defaults, then the --config file, then the flags."""
    cls = classes[section]
    given = {k: v for k, v in vars(ns).items() if k not in ("config", "command", "func", "data_command")}
    values: dict[str, Any] = {}
    config_path = getattr(ns, "config", None)
    if config_path:
        data = load_yaml(config_path)
        # The whole file is checked, not just what this stage reads: a misspelled top-level key or
        # section would otherwise be ignored in favour of a default without a word.
        check_known_keys(data, classes, str(config_path))
        values.update(values_for_stage(data, classes, section, str(config_path)))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in given.items() if k in names})
    return build(cls, values)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
