"""CHAIR on COCO captions against the reference algorithm: lmms-eval 0.7.3's coco_cap_chair task, run.

lmms-eval reads captions with NLTK (word_tokenize, pos_tag, WordNet's lemmatizer), whose data cannot be
downloaded at test time. The test stands in for those three with what they return on these captions: the
tokens split at spaces and punctuation, and the WordNet lemma of each plural written out below. Everything
else, the vocabulary, double words, the toilet-seat rule, CHAIR_i, CHAIR_s and recall, is lmms-eval's code.
"""

import random
import re
from types import SimpleNamespace

import pytest

from mmlm.errors import InputError
from mmlm.eval.captioning import caption_metric
from mmlm.eval.chair_coco import CATEGORIES, CATEGORY_OF, coco_chair_scores, coco_mentions
from mmlm.eval.tasks import Sample
from reference_code import load_reference

# WordNetLemmatizer().lemmatize(word, "n") on the plurals the captions use
WORDNET_LEMMAS = {"dogs": "dog", "cats": "cat", "men": "man", "women": "woman", "people": "people",
                  "children": "child", "buses": "bus", "knives": "knife", "glasses": "glass", "benches": "bench",
                  "horses": "horse", "sheep": "sheep", "skis": "ski", "ties": "tie", "hydrants": "hydrant",
                  "lights": "light", "giraffes": "giraffe", "cars": "car", "bikes": "bike", "phones": "phone",
                  "tables": "table", "chairs": "chair", "cups": "cup", "boys": "boy", "girls": "girl",
                  "zebras": "zebra", "signs": "sign", "bears": "bear", "plates": "plate", "trees": "tree",
                  "umbrellas": "umbrella", "elephants": "elephant", "birds": "bird", "oranges": "orange",
                  "sandwiches": "sandwich", "boats": "boat", "mice": "mouse", "seats": "seat", "toilets": "toilet",
                  "rackets": "racket", "players": "player", "trains": "train", "jets": "jet", "cubs": "cub"}  # fmt: skip
_NLTK = SimpleNamespace(
    word_tokenize=lambda text: re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]", text),
    pos_tag=lambda words: [(w, "NN") for w in words],
)
_WORDNET = SimpleNamespace(ADJ="a", VERB="v", NOUN="n", ADV="r")
_LEMMATIZER = type("WordNetLemmatizer", (), {"lemmatize": lambda self, w, pos="n": WORDNET_LEMMAS.get(w, w)})
CHAIR = load_reference("lmms-eval", "lmms_eval/tasks/coco_cap_chair/utils.py", stubs={
    "nltk": _NLTK, "nltk.corpus": SimpleNamespace(wordnet=_WORDNET),
    "nltk.stem": SimpleNamespace(WordNetLemmatizer=_LEMMATIZER),
})  # fmt: skip

NOUNS = ["dog", "dogs", "cat", "cats", "man", "men", "woman", "women", "people", "children", "bus", "buses",
         "knife", "knives", "wine glass", "wine glasses", "bench", "benches", "horse", "horses", "sheep", "skis",
         "bow tie", "bow ties", "fire hydrant", "fire hydrants", "traffic light", "traffic lights", "giraffes",
         "car", "cars", "motor bike", "bikes", "cell phone", "phones", "dining table", "tables", "chairs", "cup",
         "boy", "girls", "baby elephant", "adult zebra", "zebras", "stop sign", "signs", "teddy bear", "bears",
         "plate", "tree", "trees", "umbrellas", "elephants", "baby birds", "oranges", "hot dog", "sandwiches",
         "boats", "mice", "toilet", "toilet seat", "seats", "tennis racket", "rackets", "players", "passenger train",
         "passenger jets", "baby cub", "cubs", "surfboard", "laptop", "pizza", "kite", "frisbee", "puppy"]  # fmt: skip
FILLER = [
    "a",
    "two",
    "the",
    "is sitting on",
    "next to",
    "with",
    "and",
    "near",
    "in front of",
    "of the",
    "holding",
]


def coco_captions(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """Return (caption, ground-truth categories): COCO-style sentences, plurals, two-word names, repeats."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 6)):
            words += [rng.choice(FILLER), rng.choice(NOUNS)]
        caption = " ".join(words) + rng.choice([".", "", " in a room.", ", outside."])
        caption = caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption
        truth = sorted(
            set(coco_mentions(caption)) - set(rng.sample(CATEGORIES, 20)) | set(rng.sample(CATEGORIES, 2))
        )
        rows.append((caption, truth))
    return rows


CAPTIONS = coco_captions(1200, seed=4)


def test_mentions_equal_lmms_eval_caption_to_words():
    for caption, _ in CAPTIONS:
        assert coco_mentions(caption) == CHAIR.caption_to_words(caption.lower())[1], caption


def test_chair_i_chair_s_and_recall_equal_lmms_eval():
    results = [CHAIR.coco_cap_chair_process_result({"question_id": i, "gt_object": truth}, [caption.lower()])
               ["coco_cap_chair_i"] for i, (caption, truth) in enumerate(CAPTIONS)]  # fmt: skip
    ours = coco_chair_scores([c for c, _ in CAPTIONS], [t for _, t in CAPTIONS])
    assert ours["chair_i"] * 100 == pytest.approx(
        CHAIR.coco_cap_chair_aggregate_results_chair_i(results), abs=1e-9
    )
    assert ours["chair_s"] * 100 == pytest.approx(
        CHAIR.coco_cap_chair_aggregate_results_chair_s(results), abs=1e-9
    )
    assert ours["recall"] * 100 == pytest.approx(
        CHAIR.coco_cap_chair_aggregate_results_recall(results), abs=1e-9
    )
    assert (
        0.05 < ours["chair_i"] < 0.6 and 0.1 < ours["chair_s"] < 0.9
    )  # hallucinations occur, not everywhere


def test_vocabulary_is_the_published_one():
    assert len(CATEGORIES) == 80 and CATEGORY_OF == CHAIR.INVERSE_SYNONYM_DICT
    assert set(CATEGORY_OF) == set(CHAIR.MSCOCO_OBJECTS)


@pytest.mark.parametrize(
    ("caption", "mentions"),
    [
        ("Two dogs chase a cat.", ["dog", "cat"]),
        ("A baby elephant beside adult giraffes", ["elephant", "giraffe"]),  # chair.py's double words
        ("wine glasses and knives", ["wine glass", "knife"]),
        ("the seat of the toilet", ["toilet"]),  # not a chair
        ("a seat by the window", ["chair"]),
        ("a man in a bow tie", ["person", "tie"]),
        ("hot dogs and a dog", ["hot dog", "dog"]),
    ],
)
def test_worked_captions(caption, mentions):
    assert coco_mentions(caption) == mentions


def test_bad_objects_raise_input_error():
    with pytest.raises(InputError):
        coco_chair_scores(["a dog"], [["doggo"]])
    with pytest.raises(InputError):
        coco_chair_scores(["a dog", "a cat"], [["dog"]])


def test_caption_metric_adds_coco_chair_for_samples_with_coco_objects():
    samples = [
        Sample("1", "q", answers=["a dog on a bench"], meta={"coco_objects": ["dog", "bench"]}),
        Sample("2", "q", answers=["two cats on a couch"], meta={"coco_objects": ["cat", "couch"]}),
    ]
    summary, _ = caption_metric(
        ["a dog on a bench", "two cats and a dog on a sofa"], samples, tokenizer="python-fallback"
    )
    assert (summary["chair_i"], summary["chair_s"], summary["chair_recall"]) == (
        pytest.approx(1 / 5),
        0.5,
        1.0,
    )
