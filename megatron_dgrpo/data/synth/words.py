"""Word lists and a pseudo-name factory for the synthetic generator (no downloads).

Names are built from syllables, so every document gets fresh entities that no model has seen in
pre-training; a :class:`NameFactory` never hands out the same name twice.
"""

from __future__ import annotations

import random

ADJECTIVES = (
    "quiet",
    "narrow",
    "ancient",
    "busy",
    "pale",
    "crooked",
    "bright",
    "muddy",
    "hollow",
    "gentle",
    "restless",
    "patient",
    "weathered",
    "silver",
    "northern",
    "southern",
    "humble",
    "stubborn",
    "careful",
    "distant",
    "broad",
    "steep",
    "faded",
    "sturdy",
    "drowsy",
    "copper",
    "amber",
    "tangled",
    "solemn",
    "curious",
    "brisk",
    "wooden",
    "crowded",
    "forgotten",
    "windy",
    "lonely",
)
NOUNS = (
    "harbor",
    "orchard",
    "market",
    "bridge",
    "mill",
    "valley",
    "library",
    "workshop",
    "chapel",
    "courtyard",
    "river",
    "meadow",
    "tower",
    "garden",
    "quarry",
    "tavern",
    "granary",
    "stable",
    "lighthouse",
    "village",
    "road",
    "forest",
    "well",
    "square",
    "hillside",
    "pier",
    "cellar",
    "vineyard",
    "schoolhouse",
    "ferry",
    "canal",
    "warehouse",
    "pasture",
    "archway",
    "kitchen",
)
PEOPLE = (
    "the clerks",
    "the fishermen",
    "the weavers",
    "the travelers",
    "the children",
    "the elders",
    "the masons",
    "the carters",
    "the students",
    "the bakers",
    "the pilgrims",
    "the guards",
    "the farmers",
    "the sailors",
    "the scribes",
    "the musicians",
    "the potters",
    "the shepherds",
)
VERBS_PAST = (
    "gathered near",
    "walked past",
    "argued about",
    "repaired",
    "painted",
    "described",
    "visited",
    "measured",
    "cleaned",
    "sketched",
    "avoided",
    "praised",
    "guarded",
    "crossed",
    "inspected",
    "remembered",
    "ignored",
    "decorated",
    "studied",
    "mapped",
    "photographed",
    "admired",
)
ADVERBS = (
    "slowly",
    "eagerly",
    "twice",
    "before dawn",
    "without a word",
    "in silence",
    "at dusk",
    "every spring",
    "once a month",
    "with some reluctance",
    "after the rains",
    "late at night",
    "for hours",
    "in the morning",
    "on market days",
    "during the long winter",
)
TIMES = (
    "that autumn",
    "in the following weeks",
    "by midsummer",
    "the next morning",
    "for a season",
    "over several years",
    "before the frost",
    "in those days",
    "at the turn of the year",
)
WEATHER = (
    "rain drummed on the roofs",
    "a cold wind came off the water",
    "fog settled in the lanes",
    "the sun baked the stones",
    "snow covered the fields",
    "the air smelled of smoke",
    "clouds gathered in the west",
    "the evenings grew long",
    "a storm rolled across the hills",
)
MATERIALS = (
    "granite",
    "oak",
    "limestone",
    "bronze",
    "cedar",
    "slate",
    "marble",
    "brick",
    "iron",
    "sandstone",
    "pine",
    "basalt",
    "copper",
    "clay",
    "glass",
    "walnut",
    "tin",
    "birch",
)
ITEM_KINDS = (
    "lantern",
    "banner",
    "compass",
    "tapestry",
    "ledger",
    "chalice",
    "sextant",
    "mosaic",
    "telescope",
    "violin",
    "medallion",
    "sundial",
    "kettle",
    "saddle",
    "manuscript",
    "figurine",
)
GOODS = (
    "salt",
    "wool",
    "timber",
    "barley",
    "pepper",
    "copper ore",
    "linen",
    "olive oil",
    "honey",
    "dried fish",
    "indigo",
    "wax",
    "hemp rope",
    "tea",
    "lamp oil",
    "flax",
)
INSTITUTIONS = (
    "observatory",
    "academy",
    "hospital",
    "printing house",
    "lighthouse",
    "botanical garden",
    "orphanage",
    "customs house",
    "theater",
    "bank",
    "foundry",
    "museum",
    "seminary",
    "mint",
)
EVENT_VERBS = (
    "founded the {place} {institution}",
    "closed the {place} {institution}",
    "rebuilt the {place} {institution}",
    "sold the {place} {institution}",
    "expanded the {place} {institution}",
    "renamed the {place} {institution}",
)
RELATIONS = (
    "mentor",
    "employer",
    "landlord",
    "physician",
    "editor",
    "guardian",
    "accountant",
    "tutor",
    "lawyer",
    "patron",
    "apprentice",
    "biographer",
)
GUILDS = (
    "Harbor",
    "Lantern",
    "Copper",
    "Willow",
    "Granite",
    "Saffron",
    "Falcon",
    "Thistle",
    "Anchor",
    "Juniper",
    "Raven",
    "Meadow",
    "Ember",
    "Cobalt",
    "Hazel",
    "Marigold",
)

_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
    "qu",
    "sh",
    "ch",
    "j",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "ll", "sk")


class NameFactory:
    """Hands out unique pseudo-words (``Velmar``) and person names (``Talvor Quenby``)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def _word(self, syllables: int) -> str:
        rng = self._rng
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
        return "".join(parts).capitalize()

    def _unique(self, make) -> str:
        while True:
            candidate = make()
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate

    def word(self) -> str:
        """A fresh capitalized pseudo-word of 2-3 syllables (places, item names)."""
        return self._unique(lambda: self._word(self._rng.choice((2, 2, 3))))

    def person(self) -> str:
        """A fresh ``First Last`` person name."""
        return self._unique(lambda: f"{self._word(self._rng.choice((1, 2)))} {self._word(2)}")

    def item(self) -> str:
        """A fresh two-word item name such as ``Brask Ovelin``."""
        return self._unique(lambda: f"{self._word(1)} {self._word(2)}")
