"""Typed settings for every stage, and the one way they are read: defaults < YAML file < flags.

Each stage's settings are a dataclass whose fields carry their own help text (litgpt style), so
`--help`, the YAML files in configs/ and the `config` saved beside every output all come from one
place. A YAML file may hold keys shared by all stages at the top level (`model`, `seed`,
`wandb_project`, ...) and one section per stage (`split:`, `sft:`, `mine:`, `dpo:`, `compare:`,
`export:`); a stage takes the shared keys it knows plus its own section, whose values win over the
shared ones (a `--set KEY=VALUE` without a section wins over both: `apply_overrides`).
Unknown keys are an error, so a typo in a config never silently falls back to a default. YAML merge
keys (`common: &c {epochs: 1}`, then `sft: {<<: *c, lr: 1e-4}`) work; a key given twice does not.

How a value is read is one rule per kind of setting, whatever route it came by (a flag's text, a
YAML value, `--set`, Python): a whole-number setting takes 8, 8.0 or 1e1 and refuses 2.5; a text
setting takes a flag's or `--set`'s text as typed (`no` stays "no", `0123` stays "0123"), and refuses
a YAML value that YAML read as true/false or a number (quote it); a true/false setting takes true/false,
yes/no, on/off or 1/0 (`truth_value`), and its flag takes one too or none (`--shared_prefix` is true,
`--shared_prefix false` and `--shared_prefix=false` turn off what a config file turned on); every path
setting (`errors.is_path_setting`) has `~` expanded and must name something (`normalise_paths`).

This module is the generic dataclass <-> argparse/YAML machinery: it knows no stage. Whoever reads
a config passes the sections it may hold as `classes` ({section: settings class}; the CLI and the
pipeline take them from the stage registry, `sarcasm_dpo.stages.settings_classes()`).

    sarcasm-dpo sft --config configs/smollm2-135m-cpu.yaml --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from .errors import UserError, is_path_setting

C = TypeVar("C")


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, alias: Sequence[str] = (),
        may_be_empty: bool = False) -> Any:
    """A dataclass field with its help text (and optional choices / extra flag names).

    `may_be_empty`: a path setting whose empty value means something (compare's `--dpo_model ""`: skip that
    model); other path settings must name something unless they may be None (`normalise_paths`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "alias": tuple(alias),
            "may_be_empty": may_be_empty}
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


class SetValue(str):
    """A `--set` value: the text as typed, with what YAML reads in it (`parsed`). `_coerce` gives a text setting the
    text (`sft.output_dir=no` is the folder "no", not False), a list setting YAML's list when it wrote one
    (`[q_proj, v_proj]`), and any other setting what YAML read (`null`, `true`, `8.0`), in errors shown as typed."""

    parsed: Any = None

    @classmethod
    def read(cls, raw: str) -> "SetValue":
        text = raw.strip()  # as the key is: `--set "sft.lr = 1e-4"`
        try:
            parsed = yaml.load(text, Loader=_UniqueKeyLoader) if text else None  # noqa: S506 - a SafeLoader
        except yaml.YAMLError:
            parsed = text
        value = cls(text)
        value.parsed = parsed
        return value


def _kinds(tp: Any) -> tuple[list, bool]:
    """(the types an annotation allows, None allowed?): `int | str | None` -> ([int, str], True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return [tp], False


def _typed_by_yaml(value: Any) -> bool:
    """A value YAML turned into true/false or a number: in a text setting its own text is lost (`0123` -> 83)."""
    return isinstance(value, (bool, int, float))


def whole_number(value: Any, name: str, shown: str | None = None) -> int:
    """THE rule for a whole-number setting, whichever route the value came by (a flag's text, YAML, `--set`,
    Python): a whole number written as 8, 8.0 or 1e1 (a numpy integer too) is that number; a fraction, true/false
    or anything else is refused with the value as it was given (`shown`), never truncated to what it is not."""
    shown = repr(value) if shown is None else shown
    number: float | None = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                pass
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or not number.is_integer():
        raise UserError(f"Setting '{name}' expects int, got {shown}: give a whole number (8, 8.0 and 1e1 are read "
                        "as 8, 8 and 10).")
    return int(number)


TRUTH_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def truth_value(value: Any, name: str, shown: str | None = None) -> bool:
    """THE rule for a true/false setting, whichever route the value came by (a flag's text, YAML, `--set`,
    Python): true/false, yes/no, on/off or 1/0 in any case (YAML's own true/false as they are); anything else is
    refused with the value as it was given (`shown`)."""
    if isinstance(value, bool):
        return value
    word = TRUTH_WORDS.get(str(value).strip().lower()) if isinstance(value, (str, numbers.Integral)) else None
    if word is None:
        shown = repr(value) if shown is None else shown
        raise UserError(f"Setting '{name}' expects true or false, got {shown}: write true/false, yes/no, on/off or "
                        f"1/0 (on the command line the flag alone, --{name}, is true).")
    return word


def _argparse_type(rule: Callable[[str, str], Any], name: str, kind: str):
    """An argparse `type=` reading a flag's text by `rule` (truth_value, whole_number): the rule's refusal becomes
    argparse's own error (a UserError raised inside parse_args would escape it), and argparse names the type `kind`."""
    def parse(text: str):
        try:
            return rule(text, name)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind
    return parse


def truth_flag(name: str):
    """An argparse `type=` for a true/false flag's optional value (`--flag false`): `truth_value`'s rule."""
    return _argparse_type(truth_value, name, "true/false")


def whole_number_flag(name: str):
    """An argparse `type=` for a whole-number flag outside the settings classes (predict's --batch_size): the
    same rule as the settings' whole numbers (`whole_number`)."""
    return _argparse_type(whole_number, name, "whole number")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML, `--set` or command-line value into the field's type, with an error that names the field
    and shows the value as it was given."""
    kinds, optional = _kinds(tp)
    shown = repr(str(value)) if isinstance(value, SetValue) else repr(value)
    if isinstance(value, SetValue):
        quoted = isinstance(value.parsed, str) and value[:1] in "'\""  # 'a b', "x": the text inside the quotes
        if kinds == [str]:  # a text setting: the text typed (`KEY=` is "", as the flag's '' is)
            value = value.parsed if quoted else str(value)
        elif typing.get_origin(kinds[0]) is list and not isinstance(value.parsed, list):
            # `a,b` (split below as a flag's text is) rather than what YAML makes of it
            value = value.parsed if quoted else str(value)
        else:
            value = value.parsed
    if value is None:
        if optional:
            return None
        raise UserError(f"Setting '{name}' cannot be empty{f' (got {shown})' if shown != 'None' else ''}.")
    if set(kinds) == {int, str}:
        # `int | str` (e.g. --batch_size 8 or auto): a number by the whole-number rule, else the word
        if isinstance(value, str):
            try:
                float(value.strip())
            except ValueError:
                return value.strip()
        return whole_number(value, name, shown)
    inner = kinds[0]
    if inner is int:  # true/false, lists and mappings included: one rule, one message
        return whole_number(value, name, shown)
    if inner is bool:  # lists and mappings included: one rule, one message
        return truth_value(value, name, shown)
    # A YAML mapping or list where one value belongs, or true/false where a number does, is a mistake in the
    # file, not something to turn into a folder named "{'a': 1}" or a sample of 1.
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and typing.get_origin(inner) is not list) \
            or (isinstance(value, bool) and inner is float):
        raise UserError(f"Setting '{name}' expects {getattr(inner, '__name__', inner)}, got {shown}.")
    if inner is str and _typed_by_yaml(value):
        raise UserError(f"Setting '{name}' expects text, got {shown}, which YAML reads as "
                        f"{'true/false' if isinstance(value, bool) else 'a number'} (so `no` would become False and "
                        f"`1.10` 1.1): put the value in quotes to keep it as text (in a config file: {name}: "
                        "\"...\").")
    try:
        if typing.get_origin(inner) is list:
            (item_tp,) = typing.get_args(inner)
            if isinstance(value, str):  # "0.01,0.05" on the command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(v, item_tp, name) for v in value]
        if inner is float:
            number = float(value)
            if not math.isfinite(number):  # nan/inf pass float() but no setting means anything at them
                raise UserError(f"Setting '{name}' must be a finite number, got {shown}.")
            return number
        if inner is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"Setting '{name}' expects {getattr(inner, '__name__', inner)}, got {shown}.") from None
    return value


@functools.lru_cache(maxsize=None)  # every settings object built asks (normalise_paths): evaluate once per class
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_file_flag(text: str) -> str:
    """--config's argparse type: the path rule of every path setting (`_path`: `~` expanded, an empty or blank
    value refused; it would otherwise run on the defaults without a word), as argparse's own error."""
    if not text.strip():
        raise argparse.ArgumentTypeError("--config is empty: name the YAML file, or leave --config out.")
    try:
        return _path("config", text, may_be_empty=False)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are suppressed so we can tell what the user actually typed."""
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", type=config_file_flag,
                        help="YAML settings file (see configs/); flags given here override it.")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        names = [f"--{f.name}", *meta.get("alias", ())]
        help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            # `--flag` alone is true; `--flag false` (or `=false`, no, off, 0) sets it off over a config file's true.
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=truth_flag(f.name),
                                metavar="true|false", default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {str(default).lower()}; the flag alone means true)")
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


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last copy, so a
    section written twice would silently lose every setting of its first copy.

    Only the mapping's own keys are compared: merge keys (`<<: *common`) are left to PyYAML, which lets a
    key of the mapping itself override a merged one, as YAML means it to. A list or mapping used as a key
    (`? [a]`) is refused here, naming it: no setting is named by one, and PyYAML would only say "unhashable"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<`: it has no constructor of its own (flatten_mapping resolves it)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                shown = self.construct_object(key_node, deep=True)
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {shown!r} is a {'list' if isinstance(shown, list) else 'mapping'}, not a "
                    "setting name (keys are words such as lr or sft)", key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice in one mapping (the "
                                                        "later copy would replace the earlier)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        """A plain decimal integer is that number; YAML 1.1's other integer forms stay the text written (`0123`
        is octal 83 there, `0x10` 16, `1:30` 90), which a whole-number setting then reads as its flag does
        (`whole_number`: 123, refused, refused) and a text setting keeps (`output_dir: 0123`)."""
        text = self.construct_scalar(node)
        if re.fullmatch(r"[-+]?(0|[1-9][0-9_]*)", text):
            return int(text.replace("_", ""))
        return text


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


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


def _check_key_names(mapping: dict, source: str, where: str = "") -> None:
    """Every key of a config mapping is a name: YAML reads `1:`, `no:` or `null:` as a number, false or null, which
    no setting is called (and which would break every message that lists keys)."""
    for key in mapping:
        if not isinstance(key, str):
            raise UserError(f"{source}: the key {key!r}{where} is not a setting name (YAML read it as "
                            f"{type(key).__name__}); keys are names such as lr or sft. Fix or remove it.")


def values_for_stage(data: dict, classes: dict[str, type], section: str, source: str = "config") -> dict:
    """The settings stage `section` (one of `classes`) takes from a YAML mapping: the shared top-level keys
    it knows plus its own section, which wins where both set a key (the file's more specific value). A
    top-level key that names a section is that section, never a setting. `--set KEY=VALUE` without a section
    overrides both (apply_overrides writes it into every section that has the key)."""
    _check_key_names(data, source)
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
    _check_key_names(section_values, source, f" in section '{section}'")
    unknown = sorted(set(section_values) - names)
    if unknown:
        raise UserError(f"{source}: unknown setting(s) in section '{section}': {', '.join(unknown)}. "
                        f"Known: {', '.join(sorted(names))}.")
    out.update(section_values)
    return out


def check_known_keys(data: dict, classes: dict[str, type], source: str = "config") -> None:
    """Every top-level key must be a stage section or a setting of at least one stage."""
    _check_key_names(data, source)
    all_names = {f.name for cls in classes.values() for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in classes and k not in all_names)
    if unknown:
        raise UserError(f"{source}: unknown setting(s): {', '.join(unknown)}.")
    for section in classes:
        values_for_stage(data, classes, section, source)


def apply_overrides(data: dict, overrides: Sequence[str], classes: dict[str, type]) -> dict:
    """A copy of a YAML mapping with `SECTION.KEY=VALUE` (or shared `KEY=VALUE`) items set, as the file would.
    `classes`: the sections that may be set ({section: settings class}).

    `KEY=VALUE` without a section sets the shared top-level key AND the key in every section of the file that
    sets it: it is typed last, so it wins everywhere (in the file a section's own value wins over the shared
    one, and `--set lr=1e-5` would otherwise leave sft's `lr:` from the file in place without a word). Items
    apply in order: `--set lr=1e-5 --set sft.lr=1e-4` gives sft 1e-4 and every other stage 1e-5.

    The value is kept as typed and as YAML reads it (`SetValue`: `64`, `1e-4`, `true`, `[q_proj, v_proj]`), then
    typed and checked like any config value when the stage's settings are built (a text setting takes the text
    as typed). Unknown sections and keys are errors.

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
        value = SetValue.read(raw)
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
            for where in sections:  # typed last, so it wins over the file's section values too
                if isinstance(out.get(where), dict) and name in out[where]:
                    out[where][name] = value
    return out


def build(cls: type[C], values: dict) -> C:
    """Instantiate a settings dataclass from raw values, coercing types; then run its checks."""
    hints = _hints(cls)
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"Unknown setting '{key}' for {cls.__name__}.")
        choices = fields[key].metadata.get("choices")
        if choices and _typed_by_yaml(value):  # `dtype: 16`: the choices say more than "quote it" would
            raise _not_a_choice(key, choices, value)
        kwargs[key] = _coerce(value, hints[key], key)
    # The flags' choices hold for a config file's values too (argparse checks only the command line).
    for f in fields.values():
        value = kwargs.get(f.name)
        # Every library that takes the seed (numpy, torch, scikit-learn) wants 0 .. 2**32 - 1.
        if f.name == "seed" and value is not None and not 0 <= value < 2**32:
            raise UserError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {value}.")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise _not_a_choice(f.name, choices, value)
    obj = cls(**kwargs)
    normalise_paths(obj)  # the settings classes do it on construction (settings.py); any other class here
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def _not_a_choice(name: str, choices: Sequence[str], value: Any) -> UserError:
    return UserError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def normalise_paths(obj: Any) -> None:
    """Every path setting of a settings dataclass (`errors.is_path_setting`: output_dir, train_csv, model, ...)
    in one form, whichever route made it (flags, a config file, `--set`, Python), so that the files a run writes,
    the lock it takes (rundir.real_output) and the paths it records agree: `~` expanded (`$VARS` are not: a
    shell expands those), a path object as its text. Refused: a path that names nothing (empty or blank, which
    would be the current folder) unless the setting may be empty (None allowed, or `opt(may_be_empty=True)`;
    a blank one then becomes None, or ""), and a control character (a newline or tab is a pasting slip that
    breaks every path the run prints). Idempotent: dataclasses.replace runs it again."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if not is_path_setting(f.name):
            continue
        value = getattr(obj, f.name)
        _, optional = _kinds(hints[f.name])
        if isinstance(value, (list, tuple)):
            new = [_path(f.name, v, False, item=True) for v in value]
        else:
            new = _path(f.name, value, optional or f.metadata.get("may_be_empty", False), optional)
        if new != value:
            setattr(obj, f.name, new)


def _path(name: str, value: Any, may_be_empty: bool, optional: bool = False, item: bool = False) -> Any:
    """One path setting's value (see `normalise_paths`); a list's NAME=PATH items (`--extra_test`) by their path."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value  # None, or a wrong type that _coerce and the stage's checks name
    writes = name.startswith("output_")
    if not value.strip():
        if may_be_empty:
            return None if optional else ""
        # An empty name would be the current folder: an output's files --overwrite replaces, an input tried as a
        # model or data folder with a misleading error.
        raise UserError(f"{name} is empty{' (only white space)' if value else ''}: "
                        + ("name the folder or file this run writes." if writes else
                           "give the path (or, for a model, the hub id) it names."))
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UserError(f"{name} {value!r} holds a control character (a newline or tab?): "
                        + ("name the folder or file this run writes without one." if writes else
                           "give the path without one."))
    label, sep, path = value.partition("=")
    if item and sep and os.sep not in label:  # NAME=PATH, read as errors.paths_named reads it
        return f"{label}={os.path.expanduser(path)}"
    return os.path.expanduser(value)


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
