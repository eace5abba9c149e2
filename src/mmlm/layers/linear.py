"""Linear projections at decode time: a few rows times a weight matrix, in the orientation the CPU streams fastest.

Decoding one token is a chain of matrix-vector products, bound by how fast the weights are read; see
docs/benchmarks.md ("Decoder LM decode speed") for the measurements behind these choices.

Which orientation is fastest depends on the CPU: on the AMD EPYC machines mmlm was tuned on, MKL streams W about
twice as fast as (W·xᵀ)ᵀ as through F.linear; on an Intel Xeon the same trick made decoding 0.65× as fast. So
the choice is measured once per process (`rows_times_matrix_pays`), and the trick is used only where it wins by
a clear margin; `MMLM_ROWS_TIMES_MATRIX=1|0` fixes the choice instead (reproducible runs, tests).
"""

import os
import statistics
import time

import torch
import torch.nn.functional as F
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


_MEASURED: list[bool] = []  # the process's one measurement, once made
# rows_times_matrix must be this much faster to be used: a near tie keeps F.linear, so that a noisy measurement
# does not flip the choice (and with it the last bits of every decode) between runs
MARGIN = 1.25


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rows_times_matrix(width: int = 1024, out: int = 4096, repeats: int = 15) -> float:
    """Return how many times faster rows_times_matrix is than F.linear for one row times a 16-MB fp32 matrix
    (larger than the caches, as a model's weights are), at the current thread count: the median of each."""
    weight, x = torch.randn(out, width), torch.randn(1, width)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: page the matrix in, let MKL pick its kernels
            F.linear(x, weight), rows_times_matrix(x, weight)
        linear = _median_seconds(lambda: F.linear(x, weight), repeats)
        rows = _median_seconds(lambda: rows_times_matrix(x, weight), repeats)
    return linear / rows


def rows_times_matrix_pays() -> bool:
    """Return whether `project` and the LM head should decode through rows_times_matrix on this CPU: the
    environment's MMLM_ROWS_TIMES_MATRIX (1 or 0) if set, else one measurement per process (MARGIN faster)."""
    if not _MEASURED:
        forced = os.environ.get("MMLM_ROWS_TIMES_MATRIX")
        _MEASURED.append(forced == "1" if forced in ("0", "1") else measure_rows_times_matrix() >= MARGIN)
    return _MEASURED[0]


def decodes_by_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Return whether x·Wᵀ should go through `rows_times_matrix`: a few rows (decoding) on CPU, a contiguous
    W, and a CPU where that orientation pays (checked last: it may measure once)."""
    return (
        x.device.type == "cpu"
        and x.numel() <= DECODE_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and rows_times_matrix_pays()
    )


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return linear(x), through `rows_times_matrix` when decoding a few rows on CPU with a plain nn.Linear.

    Anything else (a LoRA wrapper, many rows, a GPU, a weight in another memory layout, a CPU where the
    orientation does not pay) calls the module.
    """
    if type(linear) is not nn.Linear or not decodes_by_rows(x, linear.weight):
        return linear(x)
    y = rows_times_matrix(x, linear.weight).contiguous()  # strided queries would push SDPA off its CPU kernel
    return y if linear.bias is None else y + linear.bias
