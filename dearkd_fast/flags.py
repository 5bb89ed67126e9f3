"""Settings as command-line flags: `flag()` fields of frozen dataclasses become an argparse parser
(`build_parser`, `from_argv`), YAML config files (`--config`: `config_argv`, the bundled recipes), the flat
record of a run (`flat`) and the markdown tables of docs/cli.md (`flag_table`)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from dataclasses import MISSING, field
from typing import Any

from .errors import InputError
from .presets import _preset_help

__all__ = ["flag", "build_parser", "from_argv", "config_argv", "recipe_path", "RECIPES_DIR", "flat", "flag_table"]

# ---------------------------------------------------------------------------------------------- fields


def flag(default: Any = MISSING, help: str = "", *, group: str, name: str | None = None, choices=None,
         factory=None, shown: str | None = None, preset: str | None = None):
    """A dataclass field that is also a command-line flag (`--field-name` unless `name` is given).

    `shown` is the default as docs/cli.md prints it (for defaults computed at run time); `preset`
    names the InversionPreset field a None default falls back to (the help text says which values).
    """
    if preset is not None:
        help = f"{help} ({_preset_help(preset)})"
    md = {"group": group, "help": help, "flag": name, "choices": choices, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _finite(name: str, value: float | None, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    """Refuse NaN/inf and values outside [low, high] (or (low, high] with low_open)."""
    if value is None:
        return
    _check(math.isfinite(value), f"{name} must be a finite number, got {value}")
    if low is not None:
        _check(value > low if low_open else value >= low, f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None:
        _check(value <= high, f"{name} must be <= {high:g}, got {value:g}")


def _flag_fields(cls) -> list[tuple[dataclasses.Field, Any, tuple[str, ...]]]:
    """(field, type, path) of every flag of cls, nested configs included, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(g, t, (f.name, *p)) for g, t, p in _flag_fields(tp)]
        elif "group" in f.metadata:
            out.append((f, tp, (f.name,)))
    return out


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return _flag_name(f)[2:].replace("-", "_")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise InputError(message)


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, grouped as the fields say."""
    p = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, tp, _ in _flag_fields(cls):
        md = f.metadata
        g = groups.setdefault(md["group"], p.add_argument_group(md["group"]))
        kw: dict[str, Any] = {"dest": _dest(f), "help": md["help"]}
        base = _base_type(tp)
        if f.default is MISSING and f.default_factory is MISSING:
            kw["required"] = True
        elif f.default_factory is not MISSING:
            kw["default"] = None
        else:
            kw["default"] = f.default
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction if f.default is not False else "store_true"
        else:
            kw["type"] = base
            if md["choices"]:
                kw["choices"] = list(md["choices"])
        g.add_argument(_flag_name(f), **kw)
    return p


def _build(cls, values: dict[str, Any]):
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values)
        elif "group" in f.metadata:
            v = values[_dest(f)]
            if not (v is None and f.default_factory is not MISSING):
                kwargs[f.name] = v
    return cls(**kwargs)


def from_argv(cls, argv: list[str] | None, prog: str, description: str = ""):
    """Parse argv into a frozen cls; InputError (one line) on a bad flag or value. A `--config FILE` (where cls
    has the flag) stands for the flags of its YAML mapping, placed before argv so that flags given override it."""
    parser = build_parser(cls, prog, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_arg(argv) if any(f.name == "config" for f in dataclasses.fields(cls)) else None
    if path is not None:
        argv = config_argv(path, parser) + argv
    return _build(cls, vars(parser.parse_args(argv)))


RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def recipe_path(name: str) -> str:
    """--config's file: the path given, else the bundled recipe of that name (dearkd_fast/recipes/NAME.yaml)."""
    if os.path.isfile(name):
        return name
    bundled = os.path.join(RECIPES_DIR, name + ".yaml")
    if os.path.sep in name or name.endswith(".yaml"):
        raise InputError(f"--config '{name}' does not exist")
    if os.path.isfile(bundled):
        return bundled
    known = ", ".join(sorted(f.removesuffix(".yaml") for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml")))
    raise InputError(f"--config '{name}' is neither a file nor a bundled recipe ({known})")


def _config_arg(argv: list[str]) -> str | None:
    """The value of the last --config in argv (None: none given)."""
    path = None
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise InputError("argument --config: expected one argument")
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def config_argv(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """The flags a YAML config stands for: {key: value} with key a flag name (dashes or underscores, no --);
    true / false for switches, a list for a comma-separated flag, null for the default. InputError (one line,
    naming the file and the key) for an unreadable file, an unknown key or a value the flag refuses."""
    import yaml

    path = recipe_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"--config '{path}' cannot be read ({type(e).__name__})") from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise InputError(f"--config '{path}': expected a mapping of flag: value, got {type(values).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    argv: list[str] = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            import difflib

            near = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{near[0].replace('_', '-')}'?)" if near else ""
            raise InputError(f"--config '{path}': unknown key '{key}'{hint}")
        argv += _flag_tokens(path, key, action, value)
    try:
        parser.parse_args(argv)  # the file's own values, checked before they meet the command line
    except InputError as e:
        raise InputError(f"--config '{path}': {e}") from None
    return argv


def _flag_tokens(path: str, key: str, action: argparse.Action, value: Any) -> list[str]:
    flag_ = action.option_strings[0]
    switch = isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
    if value is None:
        return []
    if switch != isinstance(value, bool):
        want = "true or false" if switch else "a value, not true/false"
        raise InputError(f"--config '{path}': key '{key}' takes {want}, got {value!r}")
    if switch:
        if value:
            return [flag_]
        return ["--no-" + flag_[2:]] if isinstance(action, argparse.BooleanOptionalAction) else []
    if isinstance(value, dict):
        raise InputError(f"--config '{path}': key '{key}' takes a value or a list, not a mapping")
    return [flag_, ",".join(map(str, value)) if isinstance(value, list) else str(value)]


def flat(cfg) -> dict[str, Any]:
    """{flag dest: value} of every flag of a config (nested ones included), for summaries and metadata."""
    out: dict[str, Any] = {}
    for f, _, path in _flag_fields(type(cfg)):
        v = cfg
        for name in path:
            v = getattr(v, name)
        out[_dest(f)] = v
    return out


def flag_table(cls) -> str:
    """docs/cli.md's markdown table of every flag of cls: flag, default, meaning."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    group = None
    fields = _flag_fields(cls)
    first = {g: i for i, g in reversed(list(enumerate(f.metadata["group"] for f, _, _ in fields)))}
    for f, tp, _ in sorted(fields, key=lambda e: first[e[0].metadata["group"]]):  # a group's flags together
        md = f.metadata
        if md["group"] != group:
            group = md["group"]
            rows.append(f"| **{group}** | | |")
        name = _flag_name(f)
        names = f"`{name}`, `--no-{name[2:]}`" if _base_type(tp) is bool and f.default is not False else f"`{name}`"
        if md["shown"] is not None:
            shown = md["shown"]
        elif f.default is MISSING or f.default is None or f.default is False or f.default_factory is not MISSING:
            shown = ""
        else:
            shown = f"`{f.default}`"
        rows.append(f"| {names} | {shown} | {md['help'].replace('%%', '%')} |")
    return "\n".join(rows) + "\n"
