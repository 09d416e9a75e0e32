"""Word lists and sentence templates for the synthetic haystack and the word tasks.

Written for this package. Plain, everyday English with no digits, no all-caps words and
none of the phrases the needles use ("magic number", "VAR"), so a needle never collides
with filler and a small LM reads the filler as ordinary (if dull) prose.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = (
    "Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Henry", "Iris", "Jonas",
    "Karen", "Leo", "Maria", "Nina", "Oscar", "Paula", "Quinn", "Rosa", "Samuel", "Tara",
    "Umar", "Vera", "Walter", "Yara", "Zoe", "Hugo", "Lena", "Marco", "Nora", "Peter",
    "Ruth", "Simon", "Alice", "Tom", "Julia", "Martin", "Emma", "Felix", "Hannah", "Victor",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "market", "harbor", "library", "station", "garden", "village", "bakery", "museum",
    "school", "farm", "workshop", "kitchen", "town square", "old bridge", "forest", "beach",
    "valley", "theater", "post office", "hospital", "factory", "train yard", "cafe", "park",
    "river bank", "hill", "orchard", "town hall", "bookshop", "lighthouse", "mill", "barn",
    "meadow", "pier", "chapel", "stadium", "greenhouse", "laundry", "pharmacy", "castle",
)  # fmt: skip

NOUNS: tuple[str, ...] = (
    "apple", "basket", "bicycle", "blanket", "boat", "bottle", "bucket", "cabinet", "candle",
    "carpet", "chair", "clock", "coat", "cookie", "cup", "curtain", "desk", "door", "drum",
    "engine", "fence", "flag", "flower", "fork", "garden hose", "glove", "hammer", "hat",
    "helmet", "jacket", "jar", "kettle", "key", "ladder", "lamp", "letter", "map", "mirror",
    "mug", "needle", "notebook", "onion", "oven", "paint", "pan", "pencil", "piano", "pillow",
    "plate", "pocket", "pot", "radio", "rope", "saddle", "scarf", "shelf", "shoe", "shovel",
    "sock", "spoon", "stamp", "stove", "suitcase", "table", "teapot", "tent", "ticket",
    "towel", "tray", "trumpet", "umbrella", "vase", "wagon", "wallet", "window", "wheel",
    "whistle", "violin", "bench", "bread", "butter", "cheese", "carrot", "pumpkin", "lemon",
    "cabbage", "pepper", "potato", "tomato", "melon", "cherry", "peach", "honey", "soup",
    "pie", "cake", "kite", "ball", "puzzle", "guitar", "feather", "pebble", "shell", "leaf",
    "branch", "stone", "brick", "barrel", "crate", "sack", "thread", "button", "ribbon",
    "brush", "comb", "soap", "sponge", "bell", "anchor", "sail", "oar", "net", "cart",
    "sled", "compass", "lantern", "quilt", "rug", "sofa", "stool", "drawer", "closet",
    "envelope", "parcel", "postcard", "magazine", "newspaper", "poster", "photo", "frame",
    "canvas", "chalk", "eraser", "ruler", "scissors", "glue", "tape", "wire", "nail",
)  # fmt: skip

ADJECTIVES: tuple[str, ...] = (
    "old", "new", "small", "large", "quiet", "noisy", "bright", "dark", "warm", "cold",
    "heavy", "light", "clean", "dusty", "shiny", "rusty", "soft", "hard", "round", "narrow",
    "wide", "tall", "short", "green", "blue", "red", "yellow", "brown", "grey", "white",
    "wooden", "metal", "plain", "fancy", "cheap", "costly", "simple", "strange", "familiar",
    "useful", "broken", "sturdy", "fragile", "smooth", "rough", "sweet", "bitter", "fresh",
    "stale", "crooked", "straight", "gentle", "calm", "busy", "empty", "crowded", "tidy",
    "messy", "lovely", "ugly", "pale", "golden", "silver", "tiny", "huge", "friendly",
    "lonely", "cheerful", "gloomy", "careful", "clumsy", "patient", "proud", "shy", "brave",
    "clever", "curious", "eager", "honest", "polite",
)  # fmt: skip

VERBS: tuple[str, ...] = (
    "painted", "carried", "fixed", "found", "cleaned", "sold", "borrowed", "built", "moved",
    "opened", "watched", "described", "bought", "wrapped", "polished", "repaired", "lost",
    "returned", "measured", "counted", "weighed", "admired", "ignored", "inspected",
    "replaced", "folded", "washed", "packed", "unpacked", "dropped", "lifted", "pushed",
    "pulled", "hid", "shared", "kept", "gave away", "traded", "sketched", "photographed",
    "collected", "sorted", "labeled", "checked", "tested", "tried", "noticed", "forgot",
    "remembered", "praised",
)  # fmt: skip

TIMES: tuple[str, ...] = (
    "in the morning", "after lunch", "on Sunday", "last winter", "at dusk", "every spring",
    "before the storm", "during the holidays", "late at night", "on a rainy afternoon",
    "early in the week", "the day before", "at the end of summer", "after the market closed",
    "when the bells rang", "on the first warm day", "just before dinner", "around noon",
    "while it snowed", "the following evening",
)  # fmt: skip

WEATHER: tuple[str, ...] = (
    "the wind was gentle", "the air smelled of rain", "the sky was clear", "a light fog hung low",
    "the sun was warm", "clouds drifted slowly", "it had rained all night", "the streets were wet",
    "the evening was calm", "frost covered the grass",
)  # fmt: skip

# Slots: {name} {name2} {place} {place2} {noun} {noun2} {adj} {adj2} {verb} {time} {weather}.
# A template may start with a slot; the assembled sentence's first letter is capitalised.
TEMPLATES: tuple[str, ...] = (
    "{name} walked to the {place} and bought a {adj} {noun}.",
    "The {adj} {noun} near the {place} was still there {time}.",
    "{time}, {name} {verb} the {noun} and put it back on the shelf.",
    "Most people at the {place} agreed that the {noun} looked {adj}.",
    "{name} told {name2} that the {place} had a {adj} {noun} for sale.",
    "Nobody at the {place} remembered who {verb} the {adj} {noun}.",
    "{weather}, so {name} stayed near the {place} for a while.",
    "The {noun} in the {place} was {adj}, and the {noun2} beside it was {adj2}.",
    "{name} {verb} a {noun} {time} and was pleased with it.",
    "{time}, the {place} was {adj2} and smelled of fresh {noun}.",
    "A {adj} {noun} hung on the wall of the {place}.",
    "{name} and {name2} met at the {place} to talk about the {noun}.",
    "There was a {adj} {noun} in the corner of the {place}.",
    "{name} wondered whether the {noun} at the {place} was worth keeping.",
    "The owner of the {place} {verb} an old {noun} {time}.",
    "Children at the {place} liked the {adj} {noun} more than the {noun2}.",
    "{weather} when {name} reached the {place}.",
    "{name} left a {adj} {noun} at the {place} for {name2}.",
    "Someone had {verb} the {noun} and left it by the door of the {place}.",
    "The road from the {place} to the {place2} was {adj} and long.",
    "{name} said the {noun} reminded everyone of the {place} in the old days.",
    "{time}, {name2} {verb} a {adj} {noun} at the {place2}.",
    "It was a {adj} day at the {place}, and {weather}.",
    "The {noun2} was too {adj} to carry, so {name} asked {name2} for help.",
    "{name} kept a {adj} {noun} on the desk next to a {noun2}.",
    "People passing the {place} often stopped to look at the {adj} {noun}.",
    "After a long walk, {name} rested on a bench near the {place2}.",
    "The {adj} {noun} had been in the family for a long time.",
    "{name} carefully {verb} the {noun} before the guests arrived.",
    "At the {place}, the {noun} and the {noun2} stood side by side.",
    "{name2} laughed when {name} showed up with a {adj} {noun}.",
    "The {place} closed early {time}, and the {noun} stayed inside.",
    "{name} wrote a short note about the {adj} {noun} and the {place}.",
    "Everyone at the {place2} knew that {name} liked {adj} things.",
    "A {adj2} {noun2} was lying on the steps of the {place}.",
    "{time}, the {place} felt {adj}, and {name} went home.",
    "The story of the {adj} {noun} was told again at the {place}.",
    "{name} looked for a {noun} at the {place} but found only a {noun2}.",
    "The {noun} was {adj} but the {noun2} was even more {adj2}.",
    "{name} spent the afternoon at the {place} reading about a {adj} {noun}.",
)  # fmt: skip

ORDINALS: tuple[str, ...] = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
)  # fmt: skip

CARDINALS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)  # fmt: skip
