"""Unified image tokens: a VQ codebook turns each patch feature into a discrete code the LM reads as a word.

The "native multimodal" idea (Chameleon, Emu3) at small scale: an image tokenizer maps an image to codes,
the codes are extra entries of the LM's vocabulary, and the LM trains on interleaved text and image codes with
no connector between them. Here the tokenizer is a codebook learned by k-means on the frozen vision tower's
patch features (the VQ of van den Oord et al. 2017 without the decoder): code(x) = argmin_k ‖x − c_k‖².
It shows the mechanism, not the quality of a VQ-VAE trained on pixels: quantising loses what the
codebook cannot tell apart, which docs/fusion-styles.md measures against the continuous connectors.
"""

import torch
from torch import nn

from mmlm.errors import InputError


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
