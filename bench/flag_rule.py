"""The planted flag of `bench_flags`: is a Home Depot product a pesticide, as the `home-improvement` policy's
``pesticide`` flag defines it ("a chemical or bait made to kill, poison or repel insects, rodents, snails,
weeds, moss or fungi ... Traps, glue boards, screens, mattress covers, bug lights and sprayers sold empty are
not pesticides")?

A rule a person could write: our own word lists over the product title, then exclusions for the false friends
(spray paint sold as "Killer Cans", vibration and stain "killers", traps, zappers, nets, fabrics, sealers that
repel water). Repellents for animal pests (deer, snakes, birds) count: the definition lists "repellent sprays
and granules". `bench/flag_truth_sample.csv` holds a hand check of the rule on a sample of products.
"""
from __future__ import annotations

import re

# the active ingredient's class or a product that is one by name
NAMED = re.compile(r"\b(insecticid\w*|pesticides?|herbicides?|fungicides?|rodenticides?|miticides?|larvicides?|"
                   r"glyphosate|2,\s?4-d|foggers?|moth ?balls|weed (and|&) feed|(weed|grass|bug|snake|deer)[- ]b[- ]?gone?)\b",
                   re.I)
# what a pesticide acts on ...
PESTS = re.compile(r"\b(weeds?|nutsedge|crabgrass|vegetation|poison ivy|brush and vine|insects?|bugs?|bedbugs?|"
                   r"ants?|roach(es)?|fleas?|ticks?|termites?|wasps?|hornets?|yellow jackets?|spiders?|scorpions?|"
                   r"mosquito(es)?|rats?|mouse|mice|rodents?|slugs?|snails?|moles?|gophers?|moss|germs?|pests?|"
                   r"fl(y|ies)|moths?|grubs?|mites?|aphids?|fungus|grass killer)\b", re.I)
# ... and what it does to it, or the form it is sold in
ACTIONS = re.compile(r"\b(killer|killing|kills?|control|preventer|prevention|stop|shield|treatment|drench|spray|"
                     r"dust|granules|baits?|baitbits|bait block|stakes?|spot[- ]on|aerosol|topical|strip)\b", re.I)
REPELS = re.compile(r"\b(repellents?|repellant|repels)\b", re.I)
# false friends: devices, traps, barriers, and products that only share a word
NOT_A_PESTICIDE = re.compile(
    r"\b(spray paint|killer cans|vibration killer|stain killer|test kit|respirator|flashing|mattress|encasement|"
    r"zapper|ultra-?sonic|ultrasound|electronic|electromagnetic|electric|repeller|bug light|light trap|"
    r"attractant|misting system|net|netting|screen|fabric|barrier|weed-barrier|weed cutter|brush cutters?|"
    r"trimmers?|remover|puller|"
    r"sprayer|spray wand|water repel+[ae]nt|snow and ice|salt|sealer|trash bags|appliance|lantern|cartridges|"
    r"gazebo|hammock|storey basics)\b", re.I)
TRAPS = re.compile(r"\b(traps?|glue boards?|glue traps?)\b", re.I)
EMPTY_STATION = re.compile(r"\bbait stations?\b", re.I)


def is_pesticide(title: str) -> bool:
    """The planted rule on one product title."""
    if NOT_A_PESTICIDE.search(title):
        return False
    if TRAPS.search(title) and not re.search(r"\bkiller\b", title, re.I):
        return False
    if EMPTY_STATION.search(title) and not re.search(r"\b(killer|kills|liquid)\b", title, re.I):
        return False
    if NAMED.search(title) or REPELS.search(title):
        return True
    return bool(PESTS.search(title) and ACTIONS.search(title))


# titles that share the rule's words without matching it (the near misses a flag must get right)
NEAR = re.compile(PESTS.pattern + "|" + NAMED.pattern + "|" + REPELS.pattern + r"|\b(killer|bait|trap)\b", re.I)


def is_near_miss(title: str) -> bool:
    return bool(NEAR.search(title)) and not is_pesticide(title)
