"""Settings of ``fedctl coordinator serve`` and ``fedctl agent run`` from a config file and
``FEDCOORD_*`` environment variables.

Precedence, highest first:

1. a flag on the command line;
2. an environment variable ``FEDCOORD_<KEY>`` (``FEDCOORD_PORT=7071``);
3. the config file: ``--config FILE``, else ``$FEDCOORD_CONFIG``;
4. the built-in default (shown by ``--help``).

The file is TOML (``.toml``) or YAML (``.yaml``, ``.yml``) with one table per command:
``coordinator`` for ``fedctl coordinator serve``, ``agent`` for ``fedctl agent run`` (one file
may hold both). A key is its command's long flag without the dashes, ``-`` written ``_``
(``--max-chunk-bytes`` is ``max_chunk_bytes``, env ``FEDCOORD_MAX_CHUNK_BYTES``). Switches
(``--insecure``) take true or false; repeatable flags (``--app``, ``--rate-limit``) a list
(in the environment: comma-separated). A list given by flags replaces the file's or the
environment's list. Relative paths in a file are relative to the file's folder.

An unknown table or key, or a value of the wrong type, is a :class:`ConfigError` (exit 2)
naming the file (or variable) and the key, when the file is loaded: before anything starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedctl.errors import CliError

ENV_PREFIX = "FEDCOORD_"
CONFIG_ENV = "FEDCOORD_CONFIG"
#: Flags that are never settings: what to read, how to log, and the admin token (the
#: agent never uses it; admin commands read $FEDCOORD_TOKEN themselves).
_NOT_SETTINGS = frozenset({"help", "config", "verbose", "token"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(CliError):
    """A config file or ``FEDCOORD_*`` variable that cannot be used (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


@dataclass(frozen=True)
class Setting:
    """One configurable flag of a command."""

    key: str
    action: argparse.Action

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def is_switch(self) -> bool:
        return self.action.nargs == 0 and isinstance(self.action.const, bool)

    @property
    def is_list(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def is_path(self) -> bool:
        return self.action.type is Path


def settings_of(parser: argparse.ArgumentParser) -> dict[str, Setting]:
    """The configurable flags of a command's parser, by key."""
    out: dict[str, Setting] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest == argparse.SUPPRESS:
            continue
        key = longs[0][2:].replace("-", "_")
        if key in _NOT_SETTINGS or action.dest in _NOT_SETTINGS:
            continue
        out[key] = Setting(key, action)
    return out


def config_path(flag: Path | None, environ: Mapping[str, str]) -> Path | None:
    if flag is not None:
        return flag
    value = environ.get(CONFIG_ENV, "").strip()
    return Path(value) if value else None


def load_file(path: Path, sections: Mapping[str, Mapping[str, Setting]]
              ) -> dict[str, dict[str, Any]]:
    """The file's tables, every key checked and converted (section -> dest -> value)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    raw = _parse(path, text)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected tables {', '.join(map(repr, sections))}, "
                          f"got {type(raw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown table {str(section)[:40]!r} (known: "
                              f"{', '.join(sections)})")
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section!r} must be a table of settings")
        settings = sections[section]
        values: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{path}: key '{section}.{str(key)[:40]}'"
            setting = settings.get(str(key).replace("-", "_"))
            if setting is None:
                raise ConfigError(f"{where} is not a setting of {_command(section)} "
                                  f"(known: {', '.join(sorted(settings))})")
            values[setting.action.dest] = _from_file(setting, value, where, path.parent)
        out[section] = values
    return out


def load_env(settings: Mapping[str, Setting], environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``FEDCOORD_<KEY>`` variables of these settings that are set (dest -> value)."""
    values: dict[str, Any] = {}
    for setting in settings.values():
        text = environ.get(setting.env)
        if text is None:
            continue
        where = f"${setting.env}"
        if setting.is_switch:
            values[setting.action.dest] = _switch(text, where)
        elif setting.is_list:
            values[setting.action.dest] = [_convert(setting, item.strip(), where)
                                           for item in text.split(",") if item.strip()]
        else:
            values[setting.action.dest] = _convert(setting, text, where)
    return values


def apply(args: argparse.Namespace, defaults: Mapping[str, Any],
          settings: Mapping[str, Setting]) -> None:
    """Lists from the environment or file for the repeatable flags not given on the command
    line (argparse would append the flags to a list default instead of replacing it)."""
    for setting in settings.values():
        dest = setting.action.dest
        if setting.is_list and not getattr(args, dest) and dest in defaults:
            setattr(args, dest, list(defaults[dest]))


def _command(section: str) -> str:
    return {"coordinator": "`fedctl coordinator serve`",
            "agent": "`fedctl agent run`"}.get(section, section)


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    raise ConfigError(f"{path}: a config file is .toml, .yaml or .yml")


def _from_file(setting: Setting, value: Any, where: str, base: Path) -> Any:
    if setting.is_switch:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r:.40}")
        return value
    if setting.is_list:
        items = value if isinstance(value, list) else [value]
        return [_scalar(setting, item, where, base) for item in items]
    return _scalar(setting, value, where, base)


def _scalar(setting: Setting, value: Any, where: str, base: Path) -> Any:
    if isinstance(value, (dict, list, bool)) or value is None:
        raise ConfigError(f"{where}: expected a single value, got {value!r:.40}")
    converted = _convert(setting, str(value), where)
    if setting.is_path and isinstance(converted, Path) and not converted.is_absolute():
        converted = base / converted
    return converted


def _switch(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{where}: expected true or false (1/0, yes/no, on/off), got "
                      f"{text[:40]!r}")


def _convert(setting: Setting, text: str, where: str) -> Any:
    convert: Callable[[str], Any] = setting.action.type or str  # type: ignore[assignment]
    try:
        value = convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(convert, "__name__", "value")
        raise ConfigError(f"{where}: expected {kind}, got {text[:40]!r}") from None
    choices = setting.action.choices
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got "
                          f"{text[:40]!r}")
    return value


def resolve(section: str, parsers: Mapping[str, argparse.ArgumentParser],
            flag: Path | None, environ: Mapping[str, str] | None = None
            ) -> tuple[dict[str, Any], dict[str, Setting]]:
    """The defaults of ``section``'s command from the file and the environment (env over
    file), by argparse dest; and its settings."""
    environ = os.environ if environ is None else environ
    sections = {name: settings_of(p) for name, p in parsers.items()}
    defaults: dict[str, Any] = {}
    path = config_path(flag, environ)
    if path is not None:
        defaults.update(load_file(path, sections).get(section, {}))
    defaults.update(load_env(sections[section], environ))
    return defaults, sections[section]
