"""Texts for the synthetic garments: FashionIQ-style relative captions and Fashion200k product captions.

Relative captions imitate FashionIQ's crowd annotators: each of the two captions of a pair is drawn
independently from varied templates and synonyms, names all of the change or only part of it
("darker", "has longer sleeves"), sometimes says what it replaces ("is red instead of blue"), and
carries the real files' surface quirks (a stray leading space, a trailing period, a capital letter).
Product captions are word lists in a fixed order, one word per attribute, so a one-attribute change
is a one-word change, which TIRG's Fashion200k protocol ("replace A with B") needs.
"""

from __future__ import annotations

import random
import re

from cirlab.data.garment_render import ATTRIBUTES, HEMS, SLEEVES, Garment, luminance

Phrase = tuple[str, str]  # (verb, rest): "is" | "has" | "" and the words after it

NOUNS = {"dress": "dress", "shirt": "shirt", "toptee": "top"}
_COLOR_WORDS = {"grey": ("grey", "gray"), "navy": ("navy", "navy blue", "dark blue"), "purple": ("purple", "violet"),
                "beige": ("beige", "tan", "cream"), "maroon": ("maroon", "burgundy"), "teal": ("teal", "turquoise")}
_PATTERN_NOUNS = {"stripes": ("stripes",), "dots": ("polka dots", "dots", "spots"),
                  "checks": ("checks", "a plaid pattern", "a checkered pattern"),
                  "floral": ("flowers", "a floral print", "a flower pattern")}
_PATTERN_ADJECTIVES = {"plain": ("solid", "plain"), "stripes": ("striped",), "dots": ("polka dot", "dotted", "spotted"),
                       "checks": ("checked", "plaid", "checkered"), "floral": ("floral", "flowery")}
_SLEEVE_WORDS = {"short": ("short sleeves", "short sleeved"),
                 "elbow": ("elbow length sleeves", "three quarter sleeves"), "long": ("long sleeves", "long sleeved")}
_SLEEVE_LENGTHS = {"short": "short", "elbow": "elbow length", "long": "long"}
_HEM_WORDS = {"mini": ("a mini dress", "mini length", "above the knee"), "knee": ("knee length", "a knee length dress"),
              "midi": ("midi length", "mid-calf length"), "maxi": ("a maxi dress", "floor length", "ankle length"),
              "cropped": ("cropped", "a cropped {noun}"), "hip": ("hip length", "regular length"),
              "tunic": ("tunic length", "a long {noun}")}
_NECK_NOUNS = {"crew": ("a round neck", "a crew neckline", "a crew neck"), "v-neck": ("a v-neck", "a v neckline"),
               "square": ("a square neckline", "a square neck"), "scoop": ("a scoop neck", "a scoop neckline"),
               "collar": ("a collar",)}
_PRINT_NOUNS = {"star": ("a star", "a star graphic", "a star print"), "heart": ("a heart", "a heart graphic"),
                "logo": ("a logo", "a round logo", "a circle logo"), "text": ("writing", "text", "lettering"),
                "moon": ("a moon", "a crescent moon", "a moon graphic")}
_DARKER = 0.15  # luminance gap above which "darker" / "lighter" describes a colour change


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return rng.choice(options)


def _color_phrases(rng: random.Random, old: str, new: str) -> list[Phrase]:
    a, b = _pick(rng, _COLOR_WORDS.get(old, (old,))), _pick(rng, _COLOR_WORDS.get(new, (new,)))
    phrases = [("is", b), ("is", f"{b} instead of {a}"), ("is", f"{b} not {a}"), ("is", f"{b} rather than {a}"),
               ("", f"{b} colored"), ("is", f"in {b}")]
    gap = luminance(new) - luminance(old)
    if gap < -_DARKER:
        phrases += [("is", "darker"), ("is", "a darker color"), ("is", f"darker and {b}")]
    elif gap > _DARKER:
        phrases += [("is", "lighter"), ("is", "brighter"), ("is", "a lighter color")]
    return phrases


def _pattern_phrases(rng: random.Random, old: str, new: str, color: str) -> list[Phrase]:
    if new == "plain":
        a = _pick(rng, _PATTERN_NOUNS[old])
        return [("is", "solid"), ("is", "plain"), ("is", f"solid {_pick(rng, _COLOR_WORDS.get(color, (color,)))}"),
                ("has", f"no {a.removeprefix('a ')}"), ("", f"without {a}"),
                ("is", f"solid instead of {_pick(rng, _PATTERN_ADJECTIVES[old])}")]
    b_noun, b_adj = _pick(rng, _PATTERN_NOUNS[new]), _pick(rng, _PATTERN_ADJECTIVES[new])
    if old == "plain":
        return [("has", b_noun), ("is", b_adj), ("is", f"{b_adj} instead of solid"), ("", f"with {b_noun}"),
                ("is", f"{b_adj} not plain")]
    return [("has", f"{b_noun} instead of {_pick(rng, _PATTERN_NOUNS[old])}"),
            ("is", f"{b_adj} not {_pick(rng, _PATTERN_ADJECTIVES[old])}"), ("is", b_adj), ("has", b_noun)]


def _sleeve_phrases(rng: random.Random, old: str, new: str) -> list[Phrase]:
    longer = SLEEVES.index(new) > SLEEVES.index(old)
    phrases = [("has", "longer sleeves" if longer else "shorter sleeves")]
    if new == "sleeveless":
        phrases += [("is", "sleeveless"), ("has", "no sleeves"), ("", "without sleeves")]
    else:
        words = _pick(rng, _SLEEVE_WORDS[new])
        phrases.append(("is", words) if words.endswith("sleeved") else ("has", words))
        if old == "sleeveless":
            phrases += [("has", "sleeves"), ("", "with sleeves")]
        else:
            phrases.append(("has", f"{_SLEEVE_WORDS[new][0]} instead of {_SLEEVE_LENGTHS[old]} ones"))
    return phrases


def _hem_phrases(rng: random.Random, old: str, new: str, noun: str) -> list[Phrase]:
    hems = HEMS["dress"] if old in HEMS["dress"] else HEMS["shirt"]
    longer = hems.index(new) > hems.index(old)
    comparative = "longer" if longer else "shorter"
    return [("is", comparative), ("has", f"a {comparative} hem"), ("is", f"{comparative} in length"),
            ("is", _pick(rng, _HEM_WORDS[new]).format(noun=noun))]


def _neckline_phrases(rng: random.Random, old: str, new: str) -> list[Phrase]:
    b = _pick(rng, _NECK_NOUNS[new])
    phrases = [("has", b), ("has", f"{b} instead of {_pick(rng, _NECK_NOUNS[old])}"), ("has", "a different neckline")]
    if new == "collar":
        phrases.append(("is", "collared"))
    if new == "v-neck":
        phrases.append(("is", "v-necked"))
    if old == "collar":
        phrases.append(("has", "no collar"))
    return phrases


def _print_phrases(rng: random.Random, old: str, new: str) -> list[Phrase]:
    if new == "none":
        return [("has", "no graphic"), ("has", f"no {_pick(rng, _PRINT_NOUNS[old]).removeprefix('a ')}"),
                ("has", "nothing printed on the front"), ("is", "plain on the front")]
    b = _pick(rng, _PRINT_NOUNS[new])
    if old == "none":
        return [("has", b), ("has", f"{b} on the front"), ("has", "a graphic on the front"), ("", f"with {b}")]
    return [("has", f"{b} instead of {_pick(rng, _PRINT_NOUNS[old])}"), ("has", b), ("has", "a different graphic")]


def _phrase(rng: random.Random, attribute: str, reference: Garment, target: Garment) -> Phrase:
    old, new = getattr(reference, attribute), getattr(target, attribute)
    if attribute == "color":
        options = _color_phrases(rng, old, new)
    elif attribute == "pattern":
        options = _pattern_phrases(rng, old, new, target.color)
    elif attribute == "sleeves":
        options = _sleeve_phrases(rng, old, new)
    elif attribute == "hem":
        options = _hem_phrases(rng, old, new, NOUNS[target.category])
    elif attribute == "neckline":
        options = _neckline_phrases(rng, old, new)
    else:
        options = _print_phrases(rng, old, new)
    return rng.choice(options)


def _join(rng: random.Random, phrases: list[Phrase]) -> str:
    """Phrases as one caption: a verb is repeated only when it changes ("is red and has longer
    sleeves", "has longer sleeves and no stripes"); a "has" phrase may follow as "with ..."."""
    verb, rest = phrases[0]
    words = rest if not verb or rng.random() < 0.15 else f"{verb} {rest}"
    previous = verb
    for index, (verb, rest) in enumerate(phrases[1:], start=1):
        last = index == len(phrases) - 1
        if verb == "has" and rng.random() < 0.35:
            words += f" with {rest}"
        elif rest.startswith("with "):
            words += f" {rest}"
        else:
            words += (" and " if last else ", ") + (rest if verb in ("", previous) else f"{verb} {rest}")
        previous = verb
    return words


def _surface(rng: random.Random, caption: str) -> str:
    """The real files' quirks: capitals, trailing periods, stray spaces."""
    if rng.random() < 0.15:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.1:
        caption += "."
    if rng.random() < 0.05:
        caption = " " + caption
    if rng.random() < 0.05:
        caption += " "
    return caption


def _normalised(caption: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", caption.lower()).strip()


def _mentioned(rng: random.Random, changed: tuple[str, ...]) -> list[str]:
    """Which changed attributes one annotator names: usually all, sometimes only some."""
    if len(changed) == 1 or rng.random() < 0.6:
        chosen = list(changed)
    else:
        chosen = rng.sample(changed, rng.randint(1, len(changed) - 1))
    rng.shuffle(chosen)
    return chosen


def relative_captions(rng: random.Random, reference: Garment, target: Garment) -> tuple[list[str], list[list[str]]]:
    """Two different captions of the change from `reference` to `target` and, for each, the changed
    attributes it names (in ATTRIBUTES order)."""
    changed = reference.changed(target)
    if not changed:
        raise ValueError(f"the garments are identical, nothing to caption: {reference}")
    captions: list[str] = []
    mentioned: list[list[str]] = []
    while len(captions) < 2:  # terminates: every attribute has several phrasings
        named = _mentioned(rng, changed)
        caption = _surface(rng, _join(rng, [_phrase(rng, a, reference, target) for a in named]))
        if not captions or _normalised(caption) != _normalised(captions[0]):
            captions.append(caption)
            mentioned.append([a for a in ATTRIBUTES if a in named])
    return captions, mentioned


# Fashion200k product captions: one word per attribute. No word is a substring of another, so TIRG's
# substring-based word removal (see cirlab.data.fashion200k.parent_captions) removes exactly that word.
PRODUCT_WORDS: dict[str, dict[str, str]] = {
    "pattern": {"plain": "solid", "stripes": "striped", "dots": "dotted", "checks": "plaid", "floral": "floral"},
    "print": {"none": "", "star": "star-print", "heart": "heart-print", "logo": "logo-print", "text": "text-print",
              "moon": "moon-print"},
    "neckline": {"crew": "crew-neck", "v-neck": "v-neck", "square": "square-neck", "scoop": "scoop-neck",
                 "collar": "pointed-collar"},
    "sleeves": {"sleeveless": "sleeveless", "short": "short-sleeve", "elbow": "elbow-sleeve", "long": "long-sleeve"},
    "hem": {"mini": "mini", "knee": "knee-length", "midi": "midi", "maxi": "maxi", "cropped": "cropped",
            "hip": "hip-length", "tunic": "tunic-length"},
}


def product_caption(garment: Garment) -> str:
    """"<color> <pattern> [<print>] <neckline> <sleeves> <hem> <noun>", e.g.
    "navy striped star-print v-neck long-sleeve midi dress" (no print word when there is none)."""
    words = [garment.color] + [PRODUCT_WORDS[a][getattr(garment, a)] for a in ("pattern", "print", "neckline",
                                                                              "sleeves", "hem")]
    return " ".join(word for word in words + [NOUNS[garment.category]] if word)
