"""A fusion style: everything the rest of mmlm asks about how images reach the LM, and the registry of styles.

`connector.kind` names a style. The model, the trainer, generation, the server and the budget planner ask the
style, never its name: what module sits between tower and LM (`build`), how many LM slots one image takes
(`num_tokens`) and what fills them (`slot_tokens`), whether it hooks into the LM's layers and keeps a per-prompt
cache there (`media`, `before_block`, `generation_cache`), whether the server may batch its rows
(`batchable`), how decoded ids map back to text ids (`text_ids`), the vocabulary it adds (`extra_vocab`), what
it fits before training (`initialise`) and what it costs (`cost`).

Most styles are token connectors, an nn.Module from patch tokens [B, N, Dv] to visual tokens [B, N', D_lm]:
`register_connector(kind, builder)` makes one a style. A style that does more subclasses `FusionStyle` and
is registered with `register_style` (fusion/flamingo.py, fusion/unified.py).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mmlm.errors import InputError
from mmlm.fusion.config import ConnectorConfig
from mmlm.fusion.cost import FusionCost, FusionInput

BeforeBlock = Callable[[int, torch.Tensor], torch.Tensor]  # (LM layer, hidden states) -> hidden states


@runtime_checkable
class Connector(Protocol):
    """An nn.Module from patch tokens [B, N, Dv] to visual tokens [B, num_tokens(N), D_lm]."""

    def num_tokens(self, num_patches: int) -> int:
        """Return how many visual tokens `num_patches` patch tokens become."""
        ...

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Return visual tokens in LM width, [B, N, Dv] -> [B, num_tokens(N), D_lm]."""
        ...


class LMSpec(Protocol):
    """The LM a style is built for (an LMConfig): its width, and more for styles that reach inside it."""

    width: int
    vocab_size: int


class FusionStyle:
    """One way of joining images to the LM; the defaults are those of a token connector."""

    kind: str = ""
    batchable = True  # rows may join a running batch and their cache be trimmed (no per-prompt state)
    has_weights = True  # False: nothing to train between tower and LM (the LM learns the images instead)
    any_length = False  # it takes any number of input tokens (so it can be an audio connector)
    comparison: dict[str, Any] | None = None  # its row of the budget's comparison table (None: not shown)

    def build(self, cfg: ConnectorConfig, vision_dim: int, lm: LMSpec) -> nn.Module:
        """Return the module between tower (width `vision_dim`) and LM."""
        raise NotImplementedError

    def extra_vocab(self, cfg: ConnectorConfig) -> int:
        """Return the token ids the style adds at the end of the LM vocabulary."""
        return 0

    def check_video(self, cfg: ConnectorConfig, video_pool: int, video_merge: str) -> None:
        """Raise InputError unless this style can take `video_pool` frames per slot, merged by `video_merge`."""
        if video_merge == "resampler":
            raise InputError(
                "video_merge 'resampler' needs connector.kind 'perceiver' with time embeddings for video_pool "
                f"frames (connector.max_frames >= {video_pool}); got {cfg.kind!r} with "
                f"max_frames {cfg.max_frames}"
            )

    def num_tokens(self, module: nn.Module, num_patches: int) -> int:
        """Return the LM slots one image of `num_patches` patch tokens takes."""
        return module.num_tokens(num_patches)

    def slot_tokens(self, module: nn.Module, features: torch.Tensor, lm: nn.Module) -> torch.Tensor:
        """Return what fills one image's slots, patch features [I, N, Dv] -> [I, num_tokens, D_lm]."""
        return module(features)

    def media(
        self, module: nn.Module, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor | None
    ) -> Any:
        """Return the per-prompt state the LM's hooks read (None: the style has none). It offers `select(rows)`
        (generation drops finished rows) and `take(rows, length)` (training runs rows in groups by length)."""
        return None

    def before_block(self, module: nn.Module, media: Any) -> BeforeBlock | None:
        """Return the hook the LM runs before each layer on `media` (None: the style does not reach inside)."""
        return None

    def generation_cache(self, media: Any) -> Any:
        """Return `media` ready for one generation call (its own cache, which must have `select(rows)`)."""
        return media

    def text_ids(self, cfg: ConnectorConfig, ids: Sequence[int], vocab_size: int) -> list[int]:
        """Return the decoded ids that are text (a style's own ids have no text)."""
        return list(ids)

    def initialise(
        self, module: nn.Module, patch_features: Callable[[int], torch.Tensor | None]
    ) -> str | None:
        """Fit what the style learns before training from `patch_features(images)`, about that many training
        images' patch features [M, Dv] (None: no stage has images); return a log line (None: nothing to fit)."""
        return None

    def ready_untrained(self, module: nn.Module) -> None:
        """Make a freshly built module runnable on random weights (the budget's timing)."""

    def connector_work(self, module: nn.Module, features: torch.Tensor, fill: Callable[[], Any]) -> Any:
        """Run the style's connector stage for timing: filling the slots (`fill()`), or what stands for it."""
        return fill()

    def cost(self, cfg: ConnectorConfig, x: FusionInput) -> FusionCost:
        """Return one image's tokens and costs in this style (tokens None: no cost model)."""
        return FusionCost(cfg.kind, None, note=f"n/a: {cfg.kind} has no cost model")


ConnectorBuilder = Callable[[ConnectorConfig, int, int], nn.Module]
ConnectorCost = Callable[[ConnectorConfig, FusionInput], FusionCost]
CONNECTORS: dict[str, ConnectorBuilder] = {}
STYLES: dict[str, FusionStyle] = {}


@dataclass(eq=False)
class ConnectorStyle(FusionStyle):
    """A token connector as a style: `build_connector` builds it; its tokens fill the image slots."""

    kind: str = ""
    cost_of: ConnectorCost | None = None
    any_length: bool = False
    # its time embeddings read a video slot's frames together (video_merge resampler)
    reads_frames: bool = False
    comparison: dict[str, Any] | None = None

    def build(self, cfg: ConnectorConfig, vision_dim: int, lm: LMSpec) -> nn.Module:
        """Return the registered connector, mapping `vision_dim` to the LM's width."""
        return build_connector(cfg, vision_dim, lm.width)

    def check_video(self, cfg: ConnectorConfig, video_pool: int, video_merge: str) -> None:
        """Raise InputError unless video_merge 'resampler' meets a connector with time embeddings enough."""
        if not self.reads_frames or cfg.max_frames < video_pool:
            super().check_video(cfg, video_pool, video_merge)

    def cost(self, cfg: ConnectorConfig, x: FusionInput) -> FusionCost:
        """Return the connector's tokens and FLOPs for one image."""
        return super().cost(cfg, x) if self.cost_of is None else self.cost_of(cfg, x)


def register_style(style: FusionStyle) -> None:
    """Make `connector.kind == style.kind` mean `style`."""
    STYLES[style.kind] = style


def register_connector(
    kind: str, builder: ConnectorBuilder, cost: ConnectorCost | None = None, **options: Any
) -> None:
    """Make `build_connector` build `builder(cfg, vision_dim, lm_dim)` for `cfg.kind == kind`, and the connector a
    fusion style (`options`: ConnectorStyle's fields)."""
    CONNECTORS[kind] = builder
    register_style(ConnectorStyle(kind, cost, **options))


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int) -> nn.Module:
    """Return the connector `cfg.kind` names, mapping vision width `vision_dim` to LM width `lm_dim`."""
    if cfg.kind not in CONNECTORS:
        raise InputError(f"connector.kind: got {cfg.kind!r}; expected one of {sorted(CONNECTORS)}")
    return CONNECTORS[cfg.kind](cfg, vision_dim, lm_dim)


def fusion_style(kind: str) -> FusionStyle:
    """Return the registered fusion style `kind`."""
    if kind not in STYLES:
        raise InputError(f"connector.kind: got {kind!r}; expected one of {sorted(STYLES)}")
    return STYLES[kind]
