"""A fusion style is a plugin: one registered from this file alone trains, generates, saves and reloads."""

import pytest
import torch
from PIL import Image
from torch import nn

import mmlm
from mmlm.data.synthetic.shapes import split_combinations
from mmlm.fusion import STYLES, ConnectorConfig, FusionCost, FusionInput, FusionStyle
from mmlm.layers.flops import linear_flops
from mmlm.models.budget import Backbone, ImageInput, LMShape, plan_budget
from mmlm.models.vision import VisionConfig
from mmlm.train.mixing import corpus_texts
from mmlm.train.vlm_config import StageData, vlm_config_from_dict
from mmlm.train.vlm_loop import build_tokenizer, run_vlm_training

TINY = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
    "lm": {"width": 32, "layers": 2, "heads": 2, "kv_heads": 1, "mlp_dim": 64},
    "vocab_size": 300,
    "feature_layers": [-1],
}


class MeanPoolProjector(nn.Module):
    """One token per image: the mean of its patch features, projected to the LM width."""

    def __init__(self, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.mean(1, keepdim=True))  # [I, N, Dv] -> [I, 1, D_lm]


class MeanPoolStyle(FusionStyle):
    kind = "mean_pool"

    def build(self, cfg, vision_dim, lm):
        return MeanPoolProjector(vision_dim, lm.width)

    def cost(self, cfg: ConnectorConfig, x: FusionInput) -> FusionCost:
        per_view = x.views * x.slots
        return FusionCost("mean_pool", per_view, linear_flops(1, x.vision_dim, x.lm.width) * per_view)


@pytest.fixture
def mean_pool(monkeypatch):
    monkeypatch.setitem(STYLES, "mean_pool", MeanPoolStyle())  # gone again after the test
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_training", lambda records, out: [])
    monkeypatch.setattr("mmlm.train.vlm_loop.plot_modality_losses", lambda records, out: out)


def run_config(out, tokenizer: str | None):
    model = {**TINY, "connector": {"kind": "mean_pool"}, "tokenizer": tokenizer}
    data = {"samples": 64, "multimodal_fraction": 0.9, "text_source": "shapes"}
    stages = {"train": {"steps": 3, "train": ["connector", "lm"], "data": data}}
    return vlm_config_from_dict({"model": model, "stages": stages, "batch_size": 4, "max_length": 64,
                                 "log_every": 1, "eval_samples": 0, "out_dir": str(out), "device": "cpu"})  # fmt: skip


def test_a_style_registered_here_trains_generates_and_round_trips(mean_pool, tmp_path):
    pairs, _ = split_combinations(0)
    texts = [StageData(samples=200, multimodal_fraction=0.5, text_source="shapes", text_samples=200)]
    tokenizer = build_tokenizer(run_config(tmp_path, None), tmp_path, lambda: corpus_texts(texts, 0, pairs))
    loaded, records = run_vlm_training(run_config(tmp_path, str(tokenizer)))
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert loaded.model.image_tokens == 1
    picture = Image.new("RGB", (32, 32), "red")
    messages = [{"role": "user", "content": "<image>\nWhat color is the square?"}]
    assert (
        int((loaded.processor(messages, [picture])["input_ids"] == loaded.config.image_token_id).sum()) == 1
    )
    reply = loaded.generate(messages, [picture], max_new_tokens=4)
    batched = loaded.generate([messages, messages], [[picture], [Image.new("RGB", (32, 32), "blue")]],
                              max_new_tokens=4)  # fmt: skip
    assert batched[0] == reply

    reloaded = mmlm.load(tmp_path / "model")
    assert reloaded.config.connector.kind == "mean_pool"
    assert isinstance(reloaded.model.connector, MeanPoolProjector)
    assert reloaded.generate(messages, [picture], max_new_tokens=4) == reply


def test_the_budget_asks_a_registered_style_for_its_cost(mean_pool):
    vision = VisionConfig(
        image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, embed_dim=None
    )
    lm = LMShape(width=64, layers=2, heads=2, kv_heads=2, head_dim=32, mlp_dim=128, vocab_size=100)
    backbone = Backbone(vision, lm, ConnectorConfig(kind="mean_pool"))
    own = plan_budget(backbone, ImageInput(32, text_tokens=8)).own
    assert (own.style, own.visual_tokens, own.connector_flops) == ("mean_pool", 1, 2 * 32 * 64)
    assert "mean_pool" not in [s.kind for s in plan_budget(Backbone(vision, lm), ImageInput(32)).styles]
