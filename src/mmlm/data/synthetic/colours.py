"""Views of a shapes-world scene without its named colours: greyscale, or colours that no word names.

A tower trained on captions that always name colour and shape together can learn each seen colour×shape pair as
a whole. A view that shows the shapes but not their named colours, captioned without colour words, makes it learn
shapes apart from colours, and never shows a held-out pair (`shapes.colourless` draws such views).
"""

import re

import numpy as np
from PIL import Image

from mmlm.data.synthetic.charts import AXIS_COLOR, GRID_COLOR
from mmlm.data.synthetic.scene import BACKGROUND, COLORS

COLOURLESS_VIEWS = ("unnamed", "greyscale")  # the views `shapes.colourless` draws
# an unnamed colour's least RGB distance from each named one (the two closest named colours are 91 apart)
UNNAMED_DISTANCE = 90


def greyscale(image: Image.Image) -> Image.Image:
    """Return the image in greyscale, as RGB: its shapes without their colours."""
    return image.convert("L").convert("RGB")


def unnamed_palette(rng: np.random.Generator) -> dict[str, tuple[int, int, int]]:
    """Return a random colour for each colour name, each at least UNNAMED_DISTANCE (Euclidean, in RGB) from every
    named colour, the background and the chart's grey lines: colours that no caption or answer names."""
    named = np.array([*COLORS.values(), BACKGROUND, AXIS_COLOR, GRID_COLOR], dtype=np.float64)
    palette = {}
    for name in COLORS:
        while True:  # about one draw in five lands far enough from all eleven
            colour = rng.integers(0, 256, 3)
            if np.linalg.norm(named - colour, axis=1).min() >= UNNAMED_DISTANCE:
                palette[name] = (int(colour[0]), int(colour[1]), int(colour[2]))
                break
    return palette


def drop_colour_words(text: str) -> str:
    """Return the caption with its colour words dropped ("an orange star at the top" -> "a star at the top")."""
    text = re.sub(rf"\b(?:{'|'.join(COLORS)}) ", "", text)
    return re.sub(r"\ban (?=[^aeiou])", "a ", text)
