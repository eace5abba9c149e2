"""CHAIR on COCO (Rohrbach et al. 2018): the 80 COCO categories, their synonyms, and captions read as chair.py does.

The vocabulary is the one published with the paper (github.com/LisaAnne/Hallucination, utils/chair.py: its
synonyms text and double-word table), as lmms-eval 0.7.3's coco_cap_chair task resolves it; it cannot be
downloaded at test time, so it ships here. Each row of `COCO_SYNONYMS` is a category, then every word that names
it. A caption is read as chair.py reads it: lower-cased and tokenised, plurals made singular, two-word names
joined ("hot dog", "baby elephant" -> "elephant"), "seat" dropped when "toilet" is there, and every word in the
vocabulary counts as a mention of its category, repeats included.

  CHAIR_i = hallucinated mentions / mentions          (over all captions together)
  CHAIR_s = captions with a hallucinated mention / captions
  recall  = ground-truth categories mentioned / ground-truth categories (lmms-eval's third figure)

Deviation: chair.py singularises with pattern.en's singularize and lmms-eval with WordNet's lemmatizer, both of
which need downloaded data; `singular` applies the English plural rules that land on a vocabulary word
(docs/parity.md). Where chair.py would divide by zero (no mention, no caption) the figure is 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmlm.errors import InputError

COCO_SYNONYMS = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, goat, ewe
cow, cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""
# two words read as one: "phrase: category word" (chair.py's coco_double_words, baby/adult animals,
# passenger vehicles, "bow tie", "toilet seat" and "wine glas", pattern.en's singular of "wine glasses")
COCO_DOUBLE_WORDS = """\
motor bike: motor bike
motor cycle: motor cycle
air plane: air plane
traffic light: traffic light
street light: street light
traffic signal: traffic signal
stop light: stop light
fire hydrant: fire hydrant
stop sign: stop sign
parking meter: parking meter
suit case: suit case
sports ball: sports ball
baseball bat: baseball bat
baseball glove: baseball glove
tennis racket: tennis racket
wine glass: wine glass
hot dog: hot dog
cell phone: cell phone
mobile phone: mobile phone
teddy bear: teddy bear
hair drier: hair drier
potted plant: potted plant
bow tie: tie
laptop computer: laptop computer
stove top oven: stove top oven
home plate: home plate
train track: train track
baby bird: bird
adult bird: bird
baby cat: cat
adult cat: cat
baby dog: dog
adult dog: dog
baby horse: horse
adult horse: horse
baby sheep: sheep
adult sheep: sheep
baby cow: cow
adult cow: cow
baby elephant: elephant
adult elephant: elephant
baby bear: bear
adult bear: bear
baby zebra: zebra
adult zebra: zebra
baby giraffe: giraffe
adult giraffe: giraffe
baby animal: animal
adult animal: animal
baby cub: cub
adult cub: cub
passenger jet: jet
passenger train: train
toilet seat: toilet
wine glas: wine glass
"""


def _table(text: str) -> dict[str, str]:
    # split at ", " exactly as chair.py: its rows "scooter,  motor bike" and ",  cheesecake" keep a leading
    # space, so "motor bike" and "cheesecake" are never read as a motorcycle and a cake (kept as published)
    rows = [line.strip().split(", ") for line in text.splitlines() if line.strip()]
    return {word: row[0] for row in rows for word in row}


CATEGORY_OF = _table(COCO_SYNONYMS)  # every vocabulary word -> its COCO category
CATEGORIES = tuple(dict.fromkeys(CATEGORY_OF.values()))
DOUBLE_WORDS = dict(line.split(": ") for line in COCO_DOUBLE_WORDS.splitlines())
_KNOWN = set(CATEGORY_OF) | {w for phrase in DOUBLE_WORDS for w in phrase.split()}
_IRREGULAR = {"men": "man", "women": "woman", "mice": "mouse", "geese": "goose", "teeth": "tooth",
              "feet": "foot", "oxen": "ox", "wives": "wife", "policemen": "policeman"}  # fmt: skip
# plural endings, tried in order; the first singular the vocabulary knows is taken ("knives" -> "knife")
_PLURAL_ENDINGS = (("ies", "y"), ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", ""), ("men", "man"))
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def singular(word: str) -> str:
    """Return the vocabulary word a plural names ("buses" -> "bus", "knives" -> "knife"), else `word`."""
    if word in _KNOWN:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for ending, replacement in _PLURAL_ENDINGS:
        if word.endswith(ending) and word[: -len(ending)] + replacement in _KNOWN:
            return word[: -len(ending)] + replacement
    return word


def coco_mentions(caption: str) -> list[str]:
    """Return the COCO categories a caption mentions, in order, repeats kept ("two dogs and a puppy" -> dog, dog)."""
    words = [singular(w) for w in _TOKEN.findall(caption.lower())]
    joined, i = [], 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in DOUBLE_WORDS:
            joined.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            joined.append(words[i])
            i += 1
    if "toilet" in joined and "seat" in joined:  # chair.py: "the seat of the toilet" is not a chair
        joined = [w for w in joined if w != "seat"]
    return [CATEGORY_OF[w] for w in joined if w in CATEGORY_OF]


def coco_chair_scores(captions: Sequence[str], objects: Sequence[Sequence[str]]) -> dict[str, float]:
    """Return {"chair_i", "chair_s", "recall"} of captions against each image's COCO categories (fractions)."""
    if len(captions) != len(objects):
        raise InputError(f"expected one object list per caption, got {len(objects)} for {len(captions)}")
    mentions = hallucinations = hallucinated_captions = truth_total = truth_found = 0
    for caption, names in zip(captions, objects, strict=True):
        unknown = [n for n in names if n not in CATEGORIES]
        if isinstance(names, str) or unknown:
            raise InputError(f"objects: expected COCO category names, got {unknown or names!r}")
        said = coco_mentions(caption)
        wrong = sum(m not in names for m in said)
        mentions += len(said)
        hallucinations += wrong
        hallucinated_captions += wrong > 0
        truth_total += len(set(names))
        truth_found += len(set(names) & set(said))
    return {
        "chair_i": hallucinations / mentions if mentions else 0.0,
        "chair_s": hallucinated_captions / len(captions) if captions else 0.0,
        "recall": truth_found / truth_total if truth_total else 0.0,
    }
