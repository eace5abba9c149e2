"""Zero-shot prompt templates: OpenAI's 80 ImageNet templates, a small "simple" set, or a file of your own.

A template marks the class name with `{c}` (or `{}`); a class embedding is the renormalised mean of the
normalised embeddings of all its filled templates (CLIP, Radford et al. 2021, section 3.1.4).
"""

from pathlib import Path

from mmlm.errors import InputError

# The ensemble OpenAI published with CLIP's ImageNet evaluation, in its order.
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {c}.", "a photo of many {c}.", "a sculpture of a {c}.", "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.", "a rendering of a {c}.", "graffiti of a {c}.", "a bad photo of the {c}.",
    "a cropped photo of the {c}.", "a tattoo of a {c}.", "the embroidered {c}.", "a photo of a hard to see {c}.",
    "a bright photo of a {c}.", "a photo of a clean {c}.", "a photo of a dirty {c}.", "a dark photo of the {c}.",
    "a drawing of a {c}.", "a photo of my {c}.", "the plastic {c}.", "a photo of the cool {c}.",
    "a close-up photo of a {c}.", "a black and white photo of the {c}.", "a painting of the {c}.",
    "a painting of a {c}.", "a pixelated photo of the {c}.", "a sculpture of the {c}.", "a bright photo of the {c}.",
    "a cropped photo of a {c}.", "a plastic {c}.", "a photo of the dirty {c}.", "a jpeg corrupted photo of a {c}.",
    "a blurry photo of the {c}.", "a photo of the {c}.", "a good photo of the {c}.", "a rendering of the {c}.",
    "a {c} in a video game.", "a photo of one {c}.", "a doodle of a {c}.", "a close-up photo of the {c}.",
    "a photo of a {c}.", "the origami {c}.", "the {c} in a video game.", "a sketch of a {c}.", "a doodle of the {c}.",
    "a origami {c}.", "a low resolution photo of a {c}.", "the toy {c}.", "a rendition of the {c}.",
    "a photo of the clean {c}.", "a photo of a large {c}.", "a rendition of a {c}.", "a photo of a nice {c}.",
    "a photo of a weird {c}.", "a blurry photo of a {c}.", "a cartoon {c}.", "art of a {c}.", "a sketch of the {c}.",
    "a embroidered {c}.", "a pixelated photo of a {c}.", "itap of the {c}.", "a jpeg corrupted photo of the {c}.",
    "a good photo of a {c}.", "a plushie {c}.", "a photo of the nice {c}.", "a photo of the small {c}.",
    "a photo of the weird {c}.", "the cartoon {c}.", "art of the {c}.", "a drawing of the {c}.",
    "a photo of the large {c}.", "a black and white photo of a {c}.", "the plushie {c}.", "a dark photo of a {c}.",
    "itap of a {c}.", "graffiti of the {c}.", "a toy {c}.", "itap of my {c}.", "a photo of a cool {c}.",
    "a photo of a small {c}.", "a tattoo of the {c}.",
)  # fmt: skip

# The 7-template subset OpenAI found to work best on ImageNet (as open_clip's SIMPLE_IMAGENET_TEMPLATES).
SIMPLE_TEMPLATES = (
    "itap of a {c}.", "a bad photo of the {c}.", "a origami {c}.", "a photo of the large {c}.",
    "a {c} in a video game.", "art of the {c}.", "a photo of the small {c}.",
)  # fmt: skip

BUILTIN_TEMPLATES = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def read_templates(path: str | Path) -> list[str]:
    """Return the templates in a file, one per line; each must mark the class with `{}` or `{c}`."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"templates file {path}: cannot be read ({e})") from None
    templates = [line for line in lines if line]
    if not templates:
        raise InputError(f"templates file {path} has no templates")
    for n, t in enumerate(templates, 1):
        if "{}" not in t and "{c}" not in t:
            raise InputError(
                f"templates file {path}, template {n} {t!r}: no '{{}}' or '{{c}}' marks the class"
            )
    return templates


def resolve_templates(spec: str | None) -> list[str]:
    """Return the templates named by `spec`: "openai", "simple", a file path, or None for "openai"."""
    if spec is None:
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[spec])
    if not Path(spec).is_file():
        raise InputError(f"--templates {spec!r}: expected 'openai', 'simple' or an existing file")
    return read_templates(spec)
