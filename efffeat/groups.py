"""Groups of features: which flat feature positions a group id, a group kind, a mapping or a predicate names.

=================  ==========================================================================================
``group=``         groups
=================  ==========================================================================================
``"param"``        every feature on its own
``"neuron"``       a weight row ``"0.weight[3,:]"`` with the layer's bias entry ``"0.bias[3]"``
``"input"``        a weight column ``"0.weight[:,5]"``
``"module"``       a whole parameter tensor ``"0.weight"``
``"head"``         an attention head ``"blocks.0.attn.head[2]"``: rows ``h·d_head:(h+1)·d_head`` of the
                   q/k/v weights and biases and the same columns of the output projection's weight, for
                   TransformerLens bridges (``<attn>.q/k/v/o``), ``nn.MultiheadAttention`` (the three E-row
                   blocks of ``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight``, and
                   ``out_proj.weight``) and Hugging Face BERT-style attention (``<attn>.self.query/key/value``,
                   ``<attn>.output.dense``)
a list of ids      each feature or group id one group, e.g. ``["0.weight[3,:]", "blocks.0.attn.head[1]"]``
a mapping          ``{group name: [feature or group ids]}`` (groups may overlap)
a predicate        ``fn(tensor name) -> bool`` over state_dict names, as TransformerLens's ``names_filter``:
                   every tensor it accepts is one group
=================  ==========================================================================================

Built groups (neuron, input, module) partition the features; one-dimensional tensors that no weight absorbs
(biases without a weight, LayerNorm gains) are one group per entry under ``"neuron"`` and ``"input"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, FeatureIdError
from .ids import FeatureIds, ParamSlot

KINDS = ("param", "neuron", "input", "module", "head")
GroupSpec = str | Sequence[str] | Mapping[str, Sequence[str]] | Callable[[str], bool]


def n_heads_of(model: nn.Module) -> int | None:
    """Attention heads per layer, from the model: TransformerLens ``cfg.n_heads``, ``nn.MultiheadAttention``
    ``num_heads``, Hugging Face ``config.num_attention_heads`` (on any submodule). None when the model names no
    number, or several different ones."""
    found = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            found.add(module.num_heads)
        for value in (
            getattr(getattr(module, "cfg", None), "n_heads", None),
            getattr(getattr(module, "config", None), "num_attention_heads", None),
        ):
            if isinstance(value, int) and not isinstance(value, bool):
                found.add(value)
    return found.pop() if len(found) == 1 else None


def check(group: Any) -> None:
    """Refuse a `group=` that is none of the accepted forms, before any work is done."""
    if isinstance(group, str):
        if group not in KINDS:
            raise ConfigError(
                f"unknown group={group!r}; choose one of {', '.join(repr(g) for g in KINDS)}, or pass a list of ids, "
                "a mapping {group name: [feature ids]} or a predicate over tensor names"
            )
    elif not (callable(group) or isinstance(group, Mapping) or isinstance(group, Sequence)):
        raise ConfigError(f"group must be a kind, a list of ids, a mapping or a predicate, got {type(group).__name__}")


def partition(ids: FeatureIds, group: GroupSpec, n_heads: int | None = None) -> tuple[list[str], Tensor, Tensor]:
    """The groups of `group` (module table) as (names ``[G]``, feature positions ``[M]``, group of each ``[M]``).

    ``"param"`` is not a partition into groups (use the features themselves); it is refused here.
    """
    check(group)
    if isinstance(group, Mapping):
        return _mapped(ids, group, n_heads)
    if callable(group):
        return _selected(ids, group)
    if not isinstance(group, str):
        return _listed(ids, group, n_heads)
    if group == "head":
        return _heads(ids, n_heads)
    if group == "param":
        raise ConfigError("group='param' ranks single features; there are no groups to partition")
    names: list[str] = []
    pos: list[Tensor] = []
    gid: list[Tensor] = []
    absorbed = absorbed_biases(ids) if group == "neuron" else {}
    bias_groups: dict[str, int] = {}
    for slot in ids.slots:
        local = torch.arange(slot.numel)
        if slot.state_name in absorbed.values():
            continue
        if group == "module" or len(slot.shape) == 0:
            labels, index = [slot.state_name], torch.zeros(slot.numel, dtype=torch.long)
        elif len(slot.shape) == 1:
            labels, index = [f"{slot.state_name}[{i}]" for i in range(slot.shape[0])], local
        elif group == "neuron":
            labels, index = [row_id(slot, i) for i in range(slot.shape[0])], local // math.prod(slot.shape[1:])
        else:
            labels, index = [column_id(slot, j) for j in range(slot.shape[1])], _column_of(slot)
        if slot.state_name in absorbed:
            bias_groups[absorbed[slot.state_name]] = len(names)
        pos.append(local + slot.offset)
        gid.append(index + len(names))
        names.extend(labels)
    for slot in ids.slots:
        if slot.state_name in bias_groups:
            pos.append(torch.arange(slot.numel) + slot.offset)
            gid.append(torch.arange(slot.numel) + bias_groups[slot.state_name])
    return names, torch.cat(pos), torch.cat(gid)


def group_positions(ids: FeatureIds, group_id: str, n_heads: int | None = None) -> Tensor:
    """``[m]`` flat positions of the features of one feature or group id (`efffeat.ids` table)."""
    parsed = ids.parse(group_id)
    if parsed.kind == "head":
        names, pos, gid = _heads(ids, n_heads, prefix=parsed.tensor)
        if parsed.head >= len(names):
            raise FeatureIdError(f"{group_id!r}: head {parsed.head} does not exist; the layer has {len(names)} heads")
        return pos[gid == parsed.head]
    slot = parsed.slot
    assert slot is not None
    grid = torch.arange(slot.numel).reshape(slot.shape) if slot.shape else torch.zeros((), dtype=torch.long)
    out = grid[parsed.index].reshape(-1) + slot.offset
    bias = absorbed_biases(ids).get(slot.state_name) if parsed.kind == "neuron" else None
    if bias is not None:
        out = torch.cat([out, torch.tensor([ids.slot(bias).offset + parsed.row])])
    return out


def row_id(slot: ParamSlot, i: int) -> str:
    """The neuron id of row i of a weight: ``"0.weight[3,:]"``."""
    return f"{slot.state_name}[{','.join([str(i)] + [':'] * (len(slot.shape) - 1))}]"


def column_id(slot: ParamSlot, j: int) -> str:
    """The input id of column j of a weight: ``"0.weight[:,5]"``."""
    return f"{slot.state_name}[{','.join([':', str(j)] + [':'] * (len(slot.shape) - 2))}]"


def _column_of(slot: ParamSlot) -> Tensor:
    """``[numel]``: the column (second index) of every entry of a tensor with ≥ 2 dims."""
    grid = torch.arange(slot.shape[1]).reshape(1, slot.shape[1], *([1] * (len(slot.shape) - 2)))
    return grid.expand(slot.shape).reshape(-1)


def absorbed_biases(ids: FeatureIds) -> dict[str, str]:
    """``{weight state name: bias state name}`` for weights ``X.weight [d0, ...]`` with a bias ``X.bias [d0]``."""
    by_state = {s.state_name: s for s in ids.slots}
    out = {}
    for s in ids.slots:
        if len(s.shape) >= 2 and s.state_name.endswith("weight"):
            bias = by_state.get(s.state_name[: -len("weight")] + "bias")
            if bias is not None and bias.shape == (s.shape[0],):
                out[s.state_name] = bias.state_name
    return out


def _grid(slot: ParamSlot) -> Tensor:
    return torch.arange(slot.numel).reshape(slot.shape)


@dataclass(frozen=True)
class _AttentionLayout:
    """How one family names an attention layer's tensors (suffixes after the layer's path).

    marker: a tensor every such layer has; out: the output projection, whose columns ``h·d … (h+1)·d`` are
    head h's; rows: ``(tensor, blocks)``: head h owns rows ``b·R + h·d … b·R + (h+1)·d`` of each of the tensor's
    ``blocks`` blocks of R rows (q, k and v packed in one tensor are 3 blocks).
    """

    marker: str
    out: str
    rows: tuple[tuple[str, int], ...]


_LAYOUTS = (
    _AttentionLayout(".q.weight", ".o.weight", tuple((f".{p}.{w}", 1) for w in ("weight", "bias") for p in "qkv")),
    _AttentionLayout(".in_proj_weight", ".out_proj.weight", ((".in_proj_weight", 3), (".in_proj_bias", 3))),
    _AttentionLayout(
        ".q_proj_weight",
        ".out_proj.weight",
        ((".q_proj_weight", 1), (".k_proj_weight", 1), (".v_proj_weight", 1), (".in_proj_bias", 3)),
    ),
    _AttentionLayout(
        ".self.query.weight",
        ".output.dense.weight",
        tuple((f".self.{p}.{w}", 1) for w in ("weight", "bias") for p in ("query", "key", "value")),
    ),
)


def _heads(ids: FeatureIds, n_heads: int | None, prefix: str | None = None) -> tuple[list[str], Tensor, Tensor]:
    """Attention heads of every attention layer of a known layout (module table), one group per head."""
    by_state = {s.state_name: s for s in ids.slots}
    attns: list[tuple[str, _AttentionLayout]] = []
    for slot in ids.slots:
        for layout in _LAYOUTS:
            attn = slot.state_name[: -len(layout.marker)]
            if slot.state_name.endswith(layout.marker) and attn and f"{attn}{layout.out}" in by_state:
                if prefix is None or attn == prefix:
                    attns.append((attn, layout))
    if not attns:
        where = f"under {prefix!r}" if prefix is not None else "in this model"
        raise ConfigError(
            f"group='head' needs attention layers with q/k/v/o projections (TransformerLens "
            f"'blocks.0.attn.q.weight', nn.MultiheadAttention 'attn.in_proj_weight', Hugging Face "
            f"'attention.self.query.weight'), and there are none {where}; use group='module' or a mapping"
        )
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ConfigError(
            "group='head' needs the number of attention heads and the model does not name one number: pass "
            f"n_heads= (got {n_heads!r})"
        )
    names: list[str] = []
    pos: list[Tensor] = []
    gid: list[Tensor] = []
    for attn, layout in attns:
        out = by_state[f"{attn}{layout.out}"]
        if len(out.shape) != 2 or out.shape[1] % n_heads:
            raise ConfigError(f"{out.state_name} has {out.shape[-1]} columns, not a multiple of n_heads={n_heads}")
        d_head = out.shape[1] // n_heads
        row_slots = [(by_state[f"{attn}{t}"], blocks) for t, blocks in layout.rows if f"{attn}{t}" in by_state]
        for slot, blocks in row_slots:
            if slot.shape[0] != blocks * out.shape[1]:
                raise ConfigError(
                    f"{slot.state_name} has {slot.shape[0]} rows but the output projection takes "
                    f"{out.shape[1]} per block: grouped-query attention shares k/v between heads; rank it with "
                    "a mapping {name: [ids]}"
                )
        for h in range(n_heads):
            parts = []
            for slot, blocks in row_slots:
                for b in range(blocks):
                    rows = slice(b * out.shape[1] + h * d_head, b * out.shape[1] + (h + 1) * d_head)
                    parts.append(_grid(slot)[rows].reshape(-1) + slot.offset)
            parts.append(_grid(out)[:, h * d_head : (h + 1) * d_head].reshape(-1) + out.offset)
            p = torch.cat(parts)
            names.append(f"{attn}.head[{h}]")
            pos.append(p)
            gid.append(torch.full_like(p, len(names) - 1))
    return names, torch.cat(pos), torch.cat(gid)


def _joined(named: list[tuple[str, Tensor]]) -> tuple[list[str], Tensor, Tensor]:
    names = [name for name, _ in named]
    pos = [p for _, p in named]
    gid = [torch.full_like(p, i) for i, p in enumerate(pos)]
    return names, torch.cat(pos), torch.cat(gid)


def _mapped(
    ids: FeatureIds, mapping: Mapping[str, Sequence[str]], n_heads: int | None
) -> tuple[list[str], Tensor, Tensor]:
    if not mapping:
        raise ConfigError("the group mapping is empty; pass {group name: [feature ids]}")
    named = []
    for name, members in mapping.items():
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ConfigError(f"group {name!r} must map to a non-empty list of feature ids, got {members!r}")
        named.append((str(name), torch.unique(torch.cat([group_positions(ids, m, n_heads) for m in members]))))
    return _joined(named)


def _listed(ids: FeatureIds, listed: Sequence[str], n_heads: int | None) -> tuple[list[str], Tensor, Tensor]:
    if not listed:
        raise ConfigError("the list of group ids is empty; pass feature or group ids such as '0.weight[3,:]'")
    bad = [g for g in listed if not isinstance(g, str)]
    if bad:
        raise ConfigError(f"a list of groups holds feature or group ids (strings), got {bad[0]!r}")
    return _joined([(g.strip(), group_positions(ids, g, n_heads)) for g in listed])


def _selected(ids: FeatureIds, predicate: Callable[[str], bool]) -> tuple[list[str], Tensor, Tensor]:
    chosen = [s for s in ids.slots if predicate(s.state_name)]
    if not chosen:
        names = ", ".join(s.state_name for s in ids.slots[:6])
        raise ConfigError(f"the group predicate accepts none of the tensors ({names}, ...); check it")
    return _joined([(s.state_name, torch.arange(s.numel) + s.offset) for s in chosen])
