"""The dataset cards: one module per dataset, looked up by name."""

import importlib
from collections.abc import Iterable

from histokt.errors import UserError
from histokt.ingest.cards.base import Card, CardIndex, OptionValue, Source

# card name -> module under histokt.cards; each module defines CARD, its Card subclass.
_MODULES = {
    "adp": "adp",
    "mhist": "mhist",
    "bach": "bach",
    "ajlymph": "ajlymph",
    "pcam": "pcam",
    "crc": "crc",
    "glas": "glas",
    "os": "osteosarcoma",
    "bcss": "bcss",
    "folder": "folder",
    "csv": "csv_list",
}

CARD_NAMES = tuple(_MODULES)


def card_class(name: str) -> type[Card]:
    if name not in _MODULES:
        raise UserError(f"unknown dataset card {name!r}; choose one of: {', '.join(CARD_NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").CARD


def get_card(name: str, options: dict[str, OptionValue] | None = None) -> Card:
    return card_class(name)(**(options or {}))


def parse_options(card: type[Card], pairs: Iterable[str] | None) -> dict[str, OptionValue]:
    """Parse ``key=value`` strings to the types of the card's option defaults."""
    out: dict[str, OptionValue] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--option {pair!r}: expected KEY=VALUE")
        if key not in card.OPTION_DEFAULTS:
            known = ", ".join(sorted(card.OPTION_DEFAULTS)) or "none"
            raise UserError(f"card {card.name}: unknown option {key!r} (known options: {known})")
        default = card.OPTION_DEFAULTS[key]
        try:
            out[key] = _parse_value(value, default)
        except ValueError:
            raise UserError(f"card {card.name}: option {key}={value!r} is not a {type(default).__name__}") from None
    return out


def _parse_value(value: str, default: OptionValue) -> OptionValue:
    """``value`` as the type of ``default`` (a string where the default is None); ValueError if it is not."""
    if isinstance(default, bool):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


__all__ = ["CARD_NAMES", "Card", "CardIndex", "Source", "card_class", "get_card", "parse_options"]
