"""Linear projections at decode time: a few rows times a weight matrix, in the orientation the CPU streams fastest.

Decoding one token is a chain of matrix-vector products, bound by how fast the weights are read; see
docs/benchmarks.md ("Decoder LM decode speed") for the measurements behind these choices.
"""

import torch
from torch import nn

# Decoding feeds a few rows at a time; up to this many, `project` takes the matrix-times-columns path.
DECODE_ROWS = 8


def rows_times_matrix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return x·Wᵀ [..., out] for x [..., in] and a contiguous W [out, in], computed as (W·xᵀ)ᵀ (a strided view).

    The same product as F.linear, in the orientation MKL's CPU gemm streams W fastest for a handful of rows
    (17-20 GB/s against F.linear's 8-11 on our machine; docs/benchmarks.md). One row is sent as two: MKL's
    one-column gemv is as slow as F.linear.
    """
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    columns = (rows if rows.shape[0] > 1 else rows.expand(2, -1).contiguous()).t()  # [in, max(N, 2)]
    y = torch.mm(weight, columns)[:, : rows.shape[0]].t()  # [out, N] -> [N, out]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return linear(x), through `rows_times_matrix` when decoding a few rows on CPU with a plain nn.Linear.

    Anything else (a LoRA wrapper, many rows, a GPU, a weight in another memory layout) calls the module.
    """
    if (
        type(linear) is not nn.Linear
        or x.device.type != "cpu"
        or x.numel() > DECODE_ROWS * x.shape[-1]
        or not linear.weight.is_contiguous()
    ):
        return linear(x)
    y = rows_times_matrix(x, linear.weight).contiguous()  # strided queries would push SDPA off its CPU kernel
    return y if linear.bias is None else y + linear.bias
