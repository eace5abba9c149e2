"""An adapter mmlm's VLM trainer writes (`save_adapter`) against PEFT itself: loaded with
`peft.PeftModel.from_pretrained` on the transformers LLaVA, it gives mmlm's logits with the LoRA applied.

Each config adapts a different set of the LM's layers (fused q/k/v slices included) with its own rank and
alpha, one with rsLoRA, so the adapter's names, shapes, scaling and target_modules all have to agree with
what PEFT wraps and computes.
"""

import pytest
import torch

from fixtures_vlm import write_tiny_llava
from mmlm.checkpoints.build import build_from_weights
from mmlm.checkpoints.hf_llava import llava_key_map, llava_layout, vlm_config_from_llava
from mmlm.checkpoints.peft import llama_module_names, save_adapter
from mmlm.layers.lora import LoRALinear
from mmlm.models.vlm import VisionLanguageModel
from mmlm.train.vlm_config import LoRAConfig
from mmlm.train.vlm_loop import add_lora

peft = pytest.importorskip("peft")

CONFIGS = {
    "all-seven": LoRAConfig(rank=4, alpha=8.0),
    "q-v-rslora": LoRAConfig(rank=8, alpha=4.0, targets=["q", "v"], rslora=True),
    "out-gate-down": LoRAConfig(rank=2, alpha=6.0, targets=["out", "gate", "down"]),
}
# the LLaVA module names since transformers 4.52: the LM's layers under model.language_model
VLM_NAMES = llama_module_names("lm.", "model.language_model.")


def mmlm_copy(ref) -> VisionLanguageModel:
    """Return mmlm's VisionLanguageModel holding the transformers LLaVA's weights, as the trainer builds it."""
    cfg = vlm_config_from_llava(ref.config.to_dict())
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    return build_from_weights(
        lambda: VisionLanguageModel(cfg),
        weights,
        llava_key_map(cfg, llava_layout(set(weights))),
        "tiny llava",
    ).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_adapter_in_peft_gives_mmlm_logits(tmp_path, name):
    ref = write_tiny_llava(tmp_path / "llava")
    ours = mmlm_copy(ref)
    add_lora(ours, CONFIGS[name])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: random A and B make every adapted layer's update visible
        for module in ours.lm.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.3)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.3)
    adapted = save_adapter(ours, tmp_path / "adapter", VLM_NAMES)
    image_id = ref.config.image_token_index
    text = torch.randint(3, image_id, (2, 9), generator=gen)
    ids = torch.cat([text[:, :2], torch.full((2, ours.image_tokens), image_id), text[:, 2:]], 1)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        base = ref(input_ids=ids, pixel_values=pixels).logits
        expected = ours(ids, pixels).logits
        theirs = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()  # wraps `ref` in place
        got = theirs(input_ids=ids, pixel_values=pixels).logits
    wrapped = {n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {f"base_model.model.{n}" for n in adapted}  # PEFT wraps exactly what mmlm adapted
    assert (expected - base).abs().max() > 1e-2  # the adapter moves the logits, so agreeing means something
    # 1e-4, as test_llava_parity: the towers sum in another order (mmlm's patch embedding is a matmul, theirs a
    # convolution), which random tiny models carry to a few 1e-5 in the logits; the adapter moves them by > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
