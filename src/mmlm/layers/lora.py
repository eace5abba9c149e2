"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update,

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,    A [r, in], B [out, r], s = alpha / r  (rsLoRA: alpha / √r).

B starts at zero, so a freshly wrapped model computes exactly what the base model did.

Fused projections. mmlm's self-attention computes q, k and v with one `qkv` linear, where transformers (and
so PEFT adapters) have separate q_proj, k_proj, v_proj. A LoRA on q_proj and v_proj alone is reproduced on
the fused layer by giving each chosen slice of output rows its own pair (A_q, B_q), (A_v, B_v):

    ΔW = s · [B_q A_q ; 0 ; B_v A_v]     (row blocks q, k, v of W_qkv)

which is what PEFT computes on the split model, term for term. Each slice draws its own dropout mask, as the
separate PEFT layers do. The slices of a fused layer are named like the split layers would be, siblings of
the fused one: `blocks.0.attn.q`, `blocks.0.attn.k`, `blocks.0.attn.v` (and `k`, `v` of cross-attention `kv`).
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.errors import InputError
from mmlm.layers.attention import Attention


def fused_slices(parent: nn.Module, child: str) -> dict[str, tuple[int, int]] | None:
    """Return {projection: (first row, end row)} of the layer `parent.<child>` if it fuses several, else None."""
    if not isinstance(parent, Attention):
        return None
    q, kv = parent.heads * parent.head_dim, parent.kv_heads * parent.head_dim
    if child == "qkv" and not parent.cross:
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    if child == "kv" and parent.cross:
        return {"k": (0, kv), "v": (kv, 2 * kv)}
    return None


class LoRALinear(nn.Module):
    """A linear layer with a low-rank update on all its output rows, or on chosen slices of them (fused q/k/v).

    The base `weight` and `bias` are the wrapped layer's own Parameter objects under their own names, so state
    dict keys and checkpoint key maps stay valid; LoRA adds `lora_A` [n·r, in] (one [r, in] block per slice)
    and `lora_B` [rows of all slices, r] (the slices' B blocks stacked in row order).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        slices: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.dropout, self.rslora = rank, alpha, dropout, rslora
        # rsLoRA (Kalajdzievski 2023) keeps the update's scale stable as the rank grows
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1])) if slices else None
        rows = [(0, self.out_features)] if self.slices is None else list(self.slices.values())
        self.row_ranges = rows
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(len(rows) * rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(sum(end - start for start, end in rows), rank, **like))
        # PEFT's init: A ~ kaiming_uniform(a=√5), i.e. U(±1/√in); B = 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def pairs(self) -> list[tuple[str | None, torch.Tensor, torch.Tensor]]:
        """Return (slice name or None for the whole layer, A_i [r, in], B_i [rows_i, r]) views, in row order."""
        names = [None] if self.slices is None else list(self.slices)
        out, row = [], 0
        for i, (name, (start, end)) in enumerate(zip(names, self.row_ranges, strict=True)):
            a = self.lora_A[i * self.rank : (i + 1) * self.rank]
            out.append((name, a, self.lora_B[row : row + end - start]))
            row += end - start
        return out

    def delta_weight(self) -> torch.Tensor:
        """Return the update s·ΔW [out, in] that merging adds to `weight` (zero outside the chosen slices)."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for (_, a, b), (start, end) in zip(self.pairs(), self.row_ranges, strict=True):
            delta[start:end] = b.float() @ a.float()
        return self.scale * delta

    def up_projection(self) -> torch.Tensor:
        """Return every slice's B as one matrix [out, n·r]: B_i at its rows and its own r columns, zeros elsewhere.

        One product with it adds all slices' updates at once, where splitting the output at the slices and joining
        the parts again would copy the whole output (most of the cost of a fused qkv's LoRA on CPU).
        """
        if self.slices is None:
            return self.lora_B
        blocks = self.lora_B.new_zeros(self.out_features, len(self.row_ranges) * self.rank)
        for i, ((_, _, b), (start, end)) in enumerate(zip(self.pairs(), self.row_ranges, strict=True)):
            blocks[start:end, i * self.rank : (i + 1) * self.rank] = b
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x Wᵀ + b plus the scaled low-rank update on the adapted rows, [..., out]."""
        y = F.linear(x, self.weight, self.bias)
        if self.dropout > 0 and self.training:  # each slice draws its own mask, as PEFT's separate layers do
            low = torch.cat([F.linear(F.dropout(x, self.dropout), a) for _, a, _ in self.pairs()], -1)
        else:
            low = F.linear(x, self.lora_A)  # [.., in] -> [.., n·r]: every slice's A in one product
        # s scales the rank-r activations rather than the output: the same update, r/out of the multiplications
        return y + F.linear(low * self.scale, self.up_projection())  # [.., n·r] -> [.., out]

    def extra_repr(self) -> str:
        """Return sizes, rank, alpha and the adapted slices for print(model)."""
        where = "" if self.slices is None else f", slices={list(self.slices)}"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}{where}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def lora_units(model: nn.Module) -> list[tuple[str, str, str | None]]:
    """Return (LoRA name, module name, slice or None) for every linear layer and every slice of a fused one."""
    units = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Linear | LoRALinear):
            continue
        units.append((name, name, None))
        parent_name, _, child = name.rpartition(".")
        for part in fused_slices(model.get_submodule(parent_name), child) or {}:
            units.append((_join(parent_name, part), name, part))
    return units


def _matches(name: str, targets: list[str] | str) -> bool:
    # PEFT's rule: a list names modules by their trailing components, a string is a regex on the full name
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def add_lora(
    model: nn.Module,
    plan: dict[str, list[str] | None],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Wrap each module named in `plan` (value: its slices, or None for all rows) in LoRALinear; return the names."""
    for name in plan:
        if isinstance(model.get_submodule(name), LoRALinear):
            raise InputError(f"LoRA: {name!r} already has LoRA; merge_lora first to stack a new one")
    for name, slices in plan.items():
        base = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        rows = None
        if slices is not None:
            fused = fused_slices(parent, child) or {}
            rows = {s: fused[s] for s in slices}
        setattr(parent, child, LoRALinear(base, rank, alpha, dropout, rslora, rows))
    freeze_all_but_lora(model)
    return list(plan)


def freeze_all_but_lora(model: nn.Module) -> None:
    """Make LoRA's A and B the model's only trainable parameters."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | str,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Wrap the linear layers named by `targets` in LoRALinear, freeze everything else; return the wrapped names.

    `targets` follows PEFT: a list of names matching a layer's trailing components (["qkv", "out", "gate"]),
    or one regex matching the full name. `q`, `k`, `v` name the slices of a fused qkv (or cross-attention kv)
    layer, which then gets one LoRA per chosen slice; `qkv` itself gets one LoRA over all its rows. The model is
    changed in place; unfreeze other parameters afterwards (e.g. a projector) if they should train too.
    """
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank: expected a positive integer, got {rank!r}")
    if not alpha > 0:
        raise InputError(f"LoRA alpha: expected a positive number, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise InputError(f"LoRA dropout: expected a probability in [0, 1), got {dropout!r}")
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) and t for t in targets)):
        raise InputError(f"LoRA targets: expected a regex or a list of module names, got {targets!r}")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise InputError(f"LoRA targets: {targets!r} is not a valid regex ({e})") from None
    plan: dict[str, list[str] | None] = {}
    for unit, module, part in lora_units(model):
        if not _matches(unit, targets):
            continue
        if part is None:
            plan.setdefault(module, None)
        else:  # a named slice wins over the whole fused layer
            plan[module] = (plan.get(module) or []) + [part]
    if not plan:
        leaves = sorted({unit.rpartition(".")[2] for unit, _, _ in lora_units(model)})
        raise InputError(
            f"LoRA targets {targets!r} match no linear layer; the model's layers end in {leaves}"
        )
    return add_lora(model, plan, rank, alpha, dropout, rslora)


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA update into its base weight (W += s·B·A), put plain nn.Linear back; return their names.

    The merged weights keep requires_grad=False from apply_lora; call model.requires_grad_(True) to train them.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        lora = model.get_submodule(name)
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight, linear.bias = lora.weight, lora.bias
        with torch.no_grad():
            linear.weight += lora.delta_weight().to(linear.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return names
