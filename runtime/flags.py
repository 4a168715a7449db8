"""Command-line flags made from typed settings: one flag per field of a pydantic model, with the
field's name (`beam_size` is --beam-size), its description as help and its default shown.

Flags are read as text and handed to pydantic, so a flag, a form field of the HTTP API and an
environment variable are checked by the very same rules; a flag left out is not passed at all,
so the model's default (or, for settings, the environment) decides.
"""

import argparse
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    title: str | None = None,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    env_prefix: str | None = None,
) -> None:
    """One flag per field of `model` except `skip`, in a group titled `title`. `defaults` replaces a
    field's default for this command; `env_prefix` names the variable that sets it too."""
    group = parser.add_argument_group(title or model.__name__)
    defaults = dict(defaults or {})
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = defaults[name] if name in defaults else field.get_default(call_default_factory=True)
        help_text = field.description or ""
        help_text += f" (default: {_shown(default)})"
        if env_prefix:
            help_text += f"; env {env_prefix}{name.upper()}"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        choices = _choices(field.annotation)
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices:
            kwargs["choices"] = choices
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(flag(name), **kwargs)
    parser.set_defaults(**{f"_{model.__name__}_defaults": defaults})


def given_flags(model: type[BaseModel], args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `model` that were given on the command line (or defaulted by this command)."""
    defaults = getattr(args, f"_{model.__name__}_defaults", {})
    given = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    return {**defaults, **given}


def model_from_flags(model: type[BaseModel], args: argparse.Namespace, **overrides: Any):
    """An instance of `model` from the flags (and `overrides`, already typed); ValueError naming the
    flag for a value its rules refuse."""
    values = {**given_flags(model, args), **overrides}
    try:
        return model.model_validate(values, strict=False)
    except ValidationError as e:
        raise ValueError("; ".join(flag_errors(e))) from None


def flag_errors(error: ValidationError) -> list[str]:
    """Pydantic's errors as `--flag: message` lines."""
    lines = []
    for e in error.errors():
        name = str(e["loc"][0]) if e["loc"] else ""
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{flag(name)}: {message}" if name else message)
    return lines


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(c) for c in typing.get_args(annotation)]
    return None


def _shown(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
