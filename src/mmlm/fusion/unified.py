"""Unified image tokens: a VQ codebook turns each patch feature into a discrete code the LM reads as a word.

The "native multimodal" idea (Chameleon, Emu3) at small scale: an image tokenizer maps an image to codes,
the codes are extra entries of the LM's vocabulary, and the LM trains on interleaved text and image codes with
no connector between them. Here the tokenizer is a codebook learned by k-means on the frozen vision tower's
patch features (the VQ of van den Oord et al. 2017 without the decoder): code(x) = argmin_k ‖x − c_k‖².
It shows the mechanism, not the quality of a VQ-VAE trained on pixels: quantising loses what the
codebook cannot tell apart, which docs/fusion-styles.md measures against the continuous connectors.

`UnifiedStyle` is how the rest of mmlm sees it (fusion/style.py): the codes are the last `codebook_size` ids of
the LM vocabulary, they have no text, and the codebook is fitted by k-means before training starts.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput
from mmlm.fusion.style import FusionStyle, LMSpec

FIT_IMAGES = 1024  # about this many training images' patch features fit the codebook


class ImageCodebook(nn.Module):
    """K code vectors of the vision width; `encode` features to codes, `decode` codes to their vectors."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        if codebook_size < 2:
            raise InputError(f"connector.codebook_size: expected at least 2, got {codebook_size}")
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))  # [K, D]
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def size(self) -> int:
        """Return K, the number of codes."""
        return self.codebook.shape[0]

    def num_tokens(self, num_patches: int) -> int:
        """Return the codes per image: one per patch."""
        return num_patches

    @torch.no_grad()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Return the nearest code of every feature vector, [..., D] -> [...] long."""
        if not bool(self.fitted):
            raise InputError("the image codebook is not fitted yet; fit it on patch features first (fit)")
        flat = features.reshape(-1, features.shape[-1]).to(self.codebook.dtype)
        # ‖x − c‖² = ‖x‖² − 2·x·c + ‖c‖²; ‖x‖² is the same for every code
        distance = self.codebook.square().sum(-1) - 2 * flat @ self.codebook.T  # [M, K]
        return distance.argmin(-1).reshape(features.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the code vectors of `codes`, [...] -> [..., D]."""
        return self.codebook[codes]

    @torch.no_grad()
    def fit(self, features: torch.Tensor, iterations: int = 20, seed: int = 0) -> float:
        """Fit the codebook to feature vectors [M, D] by k-means (k-means++ start); return the mean squared error."""
        x = features.reshape(-1, features.shape[-1]).float()
        if len(x) < self.size:
            raise InputError(f"fit: {len(x)} feature vectors cannot place {self.size} codes; use more images")
        generator = torch.Generator().manual_seed(seed)
        centres = x[torch.randint(len(x), (1,), generator=generator)]
        nearest = (x - centres[0]).square().sum(-1)
        for _ in range(1, self.size):  # k-means++: the next centre is drawn ∝ squared distance to the nearest
            pick = torch.multinomial(nearest + 1e-12, 1, generator=generator)
            centres = torch.cat([centres, x[pick]])
            nearest = torch.minimum(nearest, (x - x[pick]).square().sum(-1))
        for _ in range(iterations):  # Lloyd: assign, then move each centre to its members' mean
            assign = torch.cdist(x, centres).argmin(-1)
            counts = torch.bincount(assign, minlength=self.size).clamp(min=1)[:, None].float()
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            used = torch.bincount(assign, minlength=self.size) > 0
            centres = torch.where(used[:, None], sums / counts, centres)  # an empty code keeps its place
        self.codebook.copy_(centres.to(self.codebook.dtype))
        self.fitted.fill_(True)
        return float((x - centres[torch.cdist(x, centres).argmin(-1)]).square().sum(-1).mean())


class UnifiedStyle(FusionStyle):
    """`connector.kind` unified: each patch is an image code, embedded by the LM as one of its own words."""

    kind = "unified"
    has_weights = False  # the LM learns the codes' embeddings; the codebook is fitted, not trained
    comparison = {}

    def build(self, cfg: ConnectorConfig, vision_dim: int, lm: LMSpec) -> ImageCodebook:
        """Return the codebook, whose codes must be the last ids of the LM vocabulary."""
        if cfg.codebook_size >= lm.vocab_size:
            raise InputError(
                f"connector.codebook_size: {cfg.codebook_size} codes must be the last ids of the LM vocabulary "
                f"({lm.vocab_size}); grow lm.vocab_size by the codebook size"
            )
        return ImageCodebook(cfg.codebook_size, vision_dim)

    def extra_vocab(self, cfg: ConnectorConfig) -> int:
        """Return the codebook size: the codes follow the text vocabulary."""
        return cfg.codebook_size

    def slot_tokens(self, module: nn.Module, features: torch.Tensor, lm: nn.Module) -> torch.Tensor:
        """Return the LM's embeddings of the patches' codes, [I, N, Dv] -> [I, N, D_lm] (codes as words)."""
        return lm.embed(module.encode(features) + lm.cfg.vocab_size - module.size)

    def text_ids(self, cfg: ConnectorConfig, ids: Sequence[int], vocab_size: int) -> list[int]:
        """Return `ids` without image codes, which have no text."""
        return [i for i in ids if i < vocab_size - cfg.codebook_size]

    def initialise(self, module: nn.Module, patch_features: Callable[[int], torch.Tensor | None]) -> str:
        """Fit the codebook by k-means on about FIT_IMAGES training images' patch features; return a log line."""
        features = patch_features(FIT_IMAGES)
        if features is None:
            raise InputError(
                "unified tokens: no stage has images (multimodal_fraction > 0) to fit the codebook on"
            )
        if not len(features):
            raise InputError(
                "unified tokens: the first multimodal stage gave no images to fit the codebook on"
            )
        error = module.fit(features)
        return f"image codebook: {module.size} codes fitted, mean squared error {error:.4f}"

    def ready_untrained(self, module: nn.Module) -> None:
        """Give an unfitted codebook random codes: any codebook takes the same time."""
        if not bool(module.fitted):
            module.codebook.normal_()
            module.fitted.fill_(True)

    def cost(self, cfg: ConnectorConfig, x: FusionInput) -> FusionCost:
        """Unified tokens (VQ): one image code per patch token, looked up in the LM vocabulary; no connector."""
        return FusionCost("unified", x.features * x.views * x.slots)
