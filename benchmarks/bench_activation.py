"""QuickGELU in a training step: mmlm's SiLU(1.702x)/1.702 against transformers' x·σ(1.702x).

OpenAI CLIP's activation, which every OpenAI-style CLIP checkpoint (and `mmlm train clip`'s QuickGELU towers)
runs in each MLP, is written by open_clip and transformers as `x * torch.sigmoid(1.702 * x)`: three kernels
forward, and autograd keeps their outputs for three more backward. mmlm computes the same function as
`F.silu(1.702 * x) / 1.702`, whose SiLU is one fused kernel each way. This times forward + backward of both on
the MLP activations of a CLIP training step (batch × tokens rows of the MLP width), in alternating rounds
(benchmarks/timing.py), and checks that the two agree.

The reference is transformers' `QuickGELUActivation` when transformers is installed, else the same formula
written out here (said in the output).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_activation.py
    .venv/bin/python benchmarks/bench_activation.py --quick   # toy sizes, seconds: checks that it runs
"""

import argparse
import json

import torch
from timing import interleaved_seconds, ratio_of_medians, spread

from mmlm.layers.mlp import quick_gelu

# (rows, width) of an MLP activation: a batch of 128 at 65 tokens (64-px images, 8-px patches, + class) and
# at 32 (captions), width 512; and a ViT-B/16 batch of 32 at 197 tokens, width 3072
SHAPES = {"vit_small_p8": (128 * 65, 512), "text_small": (128 * 32, 512), "vit_b16": (32 * 197, 3072)}


def reference() -> tuple[torch.nn.Module | None, str]:
    """Return transformers' QuickGELUActivation and its name, or (None, why) without transformers."""
    try:
        from transformers.activations import QuickGELUActivation
    except ImportError:
        return None, "the formula x * sigmoid(1.702 x) (transformers not installed)"
    return QuickGELUActivation(), "transformers.activations.QuickGELUActivation"


def step(activation, x: torch.Tensor):
    """Return a callable running the activation forward and backward on a fresh leaf copy of `x`."""

    def run() -> None:
        leaf = x.detach().requires_grad_()
        activation(leaf).sum().backward()

    return run


def main() -> None:
    """Time both activations on each shape and print the ratios as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small tensors, 3 rounds: checks that it runs")
    args = parser.parse_args()
    module, name = reference()
    ref = module if module is not None else (lambda x: x * torch.sigmoid(1.702 * x))
    shapes = {"toy": (256, 64)} if args.quick else SHAPES
    rounds = 3 if args.quick else args.rounds
    print(json.dumps({"reference": name, "threads": torch.get_num_threads(), "torch": torch.__version__}))
    for label, shape in shapes.items():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
        ours, theirs = quick_gelu(x), ref(x)
        difference = (ours - theirs).abs().max().item()
        seconds = interleaved_seconds({"mmlm": step(quick_gelu, x), "reference": step(ref, x)}, rounds)
        print(json.dumps({"shape": label, "rows": shape[0], "width": shape[1], "max_abs_difference": difference,
                          "mmlm_ms": spread([s * 1e3 for s in seconds["mmlm"]], 2),
                          "reference_ms": spread([s * 1e3 for s in seconds["reference"]], 2),
                          "reference_over_mmlm": ratio_of_medians(seconds["reference"], seconds["mmlm"])}))  # fmt: skip


if __name__ == "__main__":
    main()
