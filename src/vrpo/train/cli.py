"""``vrpo train``: flags mirror ``VRPOConfig`` one to one; precedence defaults < --config FILE.yaml < flags.

The flags of ``vrpo train`` and ``vrpo train-rm`` are generated from the same table
(``vrpo.train.config.SETTINGS``: kind, help, group of every setting), so the two commands
share names, checks and help. A method's own settings (``Method.settings``) are grouped
under that method in ``--help``.
"""
from __future__ import annotations

import argparse
import dataclasses

from vrpo.train.config import SETTINGS, VRPOConfig, choices_of, flag_name, read_yaml


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, dict)) and not value:
        return "none"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value).replace("%", "%%")


def _method_groups(registry: dict) -> dict[str, str]:
    """setting -> the title of the group of the methods that declare it."""
    owners: dict[str, list[str]] = {}
    for name, method in registry.items():
        for setting in method.settings:
            owners.setdefault(setting, []).append(name)
    return {s: f"{'/'.join(names)} only (--method {' or '.join(names)})" for s, names in owners.items()}


def add_setting_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of ``config_cls`` (``--field-name``), typed, grouped and documented
    from ``SETTINGS``; the defaults stay None so a --config file can set what a flag does not."""
    registry = config_cls()._method_registry()
    by_method = _method_groups(registry)
    groups: dict[str, argparse._ArgumentGroup] = {}
    parser.add_argument("--config", help="YAML file of settings (keys as the flags, - or _); flags given on the "
                        "command line win (default: none)")
    for f in dataclasses.fields(config_cls):
        setting = SETTINGS[f.name]
        title = by_method.get(f.name, setting.group)
        group = groups.setdefault(title, parser.add_argument_group(title))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = setting.help if "default" in setting.help or f.name in ("model", "data", "out") else \
            f"{setting.help} (default: {_default_text(default)})"
        kw = {"dest": f.name, "default": None, "help": text}
        choices = choices_of(f.name, registry)
        if setting.kind is bool:
            group.add_argument("--" + flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif setting.kind is list:
            group.add_argument("--" + flag_name(f.name), nargs="+", metavar="NAME", **kw)
        elif choices is not None:
            group.add_argument("--" + flag_name(f.name), choices=choices, **kw)
        else:
            group.add_argument("--" + flag_name(f.name), type=setting.kind, **kw)
    from vrpo.cli_args import add_overwrite_flag

    add_overwrite_flag(parser, "the run folder")


def settings_from_args(args: argparse.Namespace, config_cls):
    """``config_cls`` from defaults < ``--config`` < flags, validated."""
    values = read_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
                   if getattr(args, f.name, None) is not None})
    # flags are always known settings, so an unknown one can only come from the YAML file
    return config_cls.from_dict(values, source=f"--config {args.config}" if args.config else "flags").validate()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p, VRPOConfig)


def config_from_args(args: argparse.Namespace) -> VRPOConfig:
    return settings_from_args(args, VRPOConfig)


def run(args: argparse.Namespace) -> int:
    from vrpo.train.run import train

    from vrpo.train.run import summary_line

    out = train(config_from_args(args), overwrite=args.overwrite)
    print(f"saved the model, model card and run record in {out}")
    print(summary_line(out))
    return 0
