"""Length-grouped batches: a pool of several batches' samples, sorted by length and cut into batches.

Right padding makes every row of a batch as long as its longest one, so mixing one-word answers with long
captions pads the short rows to the caption's length. Drawing `groups` batches' worth of samples at once and
cutting them, sorted by length, into `groups` batches puts samples of similar length together; the batches
then come in a seeded random order, so long and short batches do not alternate in a fixed pattern. The pool
is the sampler's draw, so the order stays a function of (seed, batch number) and resumes exactly.
"""

from collections.abc import Sequence

import numpy as np


def group_by_length(lengths: Sequence[int], groups: int, seed: int, position: int) -> list[list[int]]:
    """Return `groups` lists of indices into `lengths`, sorted by length and cut into near-equal parts, in the
    seeded order of (seed, position); ties keep the draw's order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    parts = [part.tolist() for part in np.array_split(np.array(order, dtype=np.int64), groups)]
    shuffle = np.random.default_rng([seed, 3, position]).permutation(groups)
    return [parts[i] for i in shuffle]
