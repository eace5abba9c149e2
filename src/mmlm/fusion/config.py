"""ConnectorConfig: which fusion style joins the images to the LM, and that style's options."""

from dataclasses import dataclass

CONNECTOR_CONFIG_VERSION = 1


@dataclass
class ConnectorConfig:
    """Which connector to build and its options; fields a kind does not use are ignored."""

    # the fusion style: linear (LLaVA v1) | mlp (LLaVA-1.5) | pixel_shuffle (Idefics3, nanoVLM) | qformer (BLIP-2)
    # | perceiver (a resampler, its latents as tokens) | cross_attention (Flamingo: a resampler feeds gated
    # cross-attention blocks inside the LM) | unified (VQ image codes in the LM vocabulary, no connector)
    # | patch_merger (Qwen2-VL: each r×r block of patches, normed, through a two-layer MLP)
    # | pooled (Gemma 3: r×r average pooling of the patch grid, a norm, one linear)
    kind: str = "mlp"
    act: str = "gelu"  # mlp: the activation between the two layers
    bias: bool | None = None  # None: the reference's choice (linear, mlp: True; pixel_shuffle: False)
    # pixel_shuffle, patch_merger, pooled: r, the side of each block of patches merged into one token
    scale_factor: int = 2
    # patch_merger: the norm on each patch, layer (Qwen2-VL) | rms (Qwen2.5-VL); pooled: rms_offset (Gemma 3)
    norm: str = "layer"
    num_queries: int = 32  # qformer: learned queries K; perceiver, cross_attention: latents L
    depth: int = 2  # qformer, perceiver, cross_attention: blocks of the Q-Former / resampler
    heads: int = 8  # qformer, perceiver, cross_attention: attention heads of those blocks
    head_dim: int | None = None  # None: width // heads
    width: int | None = None  # qformer: hidden size (None: the vision width)
    mlp_dim: int | None = None  # qformer, perceiver, cross_attention: MLP hidden size (None: 4 × width)
    cross_attention_frequency: int = 2  # qformer: every n-th block cross-attends to the image (BLIP-2: 2)
    cross_attn_every_n_layers: int = 4  # cross_attention: a gated block before every n-th LM layer
    max_frames: int = 0  # perceiver, cross_attention: frames with a learned time embedding (0: none)
    # cross_attention, as Idefics (v1) configures it: one α per block or per channel ("float" | "vector"),
    # per-head RMSNorm on the gated blocks' q and k, LayerNorm on the resampler's; `resampler` False: the gated
    # blocks read the tower's tokens directly; `marker_token_id`: the image slots keep that token's own LM
    # embedding instead of a learned marker; `media_reset_token_id`: text after that token (Idefics: the
    # end-of-document eos) sees no image until the next one
    alpha_type: str = "float"
    qk_norm: bool = False
    resampler_qk_norm: bool = False
    resampler: bool = True
    marker_token_id: int | None = None
    media_reset_token_id: int | None = None
    codebook_size: int = 256  # unified: VQ codes, added to the LM vocabulary
    norm_eps: float | None = None  # qformer: its LayerNorms' eps (None: BLIP-2's 1e-12)
    # std of every fresh Linear (and the Q-Former's queries): transformers' initializer_range of LLaVA, BLIP-2,
    # Idefics and Idefics3, whose `_init_weights` each style follows
    initializer_range: float = 0.02
    version: int = CONNECTOR_CONFIG_VERSION
