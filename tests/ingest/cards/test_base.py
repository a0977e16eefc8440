from pathlib import Path

import pytest

from histokt.errors import UserError
from histokt.ingest.cards.base import Card


class Toy(Card):
    name = "toy"


def test_match_files():
    card, folder = Toy(), Path("raw")
    card.match_files(folder, {"a.png", "b.png"}, ["b.png", "a.png"], "labels.csv")  # one-to-one: no error
    with pytest.raises(UserError, match=r"raw/c\.png: named in labels\.csv but not found \(2 missing\)"):
        card.match_files(folder, {"a.png"}, ["c.png", "a.png", "b.png"], "labels.csv")  # first in CSV order
    with pytest.raises(UserError, match=r"raw/b\.png: has no row in labels\.csv \(2 unlabelled\)"):
        card.match_files(folder, {"a.png", "c.png", "b.png"}, ["a.png"], "labels.csv")  # first sorted
    # Keyed by stem (GlaS): a missing name gets the suffix, an unlabelled one its real file name.
    with pytest.raises(UserError, match=r"raw/x\.bmp: named in G\.csv but not found \(1 missing\)"):
        card.match_files(folder, {"y": "y.BMP"}, ["x", "y"], "G.csv", suffix=".bmp")
    with pytest.raises(UserError, match=r"raw/z\.BMP: has no row in G\.csv \(1 unlabelled\)"):
        card.match_files(folder, {"y": "y.bmp", "z": "z.BMP"}, ["y"], "G.csv", suffix=".bmp")
