"""Token sequences as highlighted text, and attention patterns of a head.

Each token of a shown sequence is one ``<span class="ef-tok">`` whose background says how much of the
feature's value that position carries (orange: positive, blue: negative, the strongest shown position fully
coloured); hovering shows the position, the token and the number. Inline styles only, so the same HTML reads
in the report, in a notebook and in a browser.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

POSITIVE = (209, 117, 43)  # the dashboards' contribution orange
NEGATIVE = (59, 111, 182)  # the dashboards' value blue


@dataclass
class TokenRow:
    """One shown sequence: its example index, label, ranked value, tokens as text, and per-position parts."""

    example: int
    label: str | None
    value: float
    tokens: list[str]
    per_position: np.ndarray | None  # [T] the part of the value each position carries
    shared: float | None = None  # the part no single position carries (biases, norm gains, dense factors)


def token_text(ids: Sequence[int], token: Callable[[int], str] | None) -> list[str]:
    """Each token id as text (`token` of the id, or the id itself)."""
    return [token(int(i)) if token is not None else str(int(i)) for i in ids]


def rows_html(title: str, rows: list[TokenRow], note: str = "") -> str:
    """A block of highlighted sequences: a heading, one line per sequence, one span per token."""
    scale = max((float(np.abs(r.per_position).max()) for r in rows if r.per_position is not None), default=0.0)
    lines = []
    for r in rows:
        meta = f"#{r.example}" + (f" y={html.escape(r.label)}" if r.label is not None else "") + f" · {r.value:.4g}"
        spans = []
        for t, text in enumerate(r.tokens):
            v = None if r.per_position is None else float(r.per_position[t])
            tip = f"position {t} · {text!r}" + ("" if v is None else f" · {v:.4g}")
            spans.append(
                f"<span class='ef-tok' style='{_background(v, scale)}padding:1px 3px;margin:0 1px;"
                f"border-radius:3px;font-family:monospace' title='{html.escape(tip, quote=True)}'>"
                f"{html.escape(text)}</span>"
            )
        shared = ""
        if r.shared is not None and r.shared != 0:
            shared = (
                f"<span style='color:#55607a;margin-left:8px' title='the part of the value no single position "
                f"carries (biases, norm gains)'>{r.shared:+.3g} shared</span>"
            )
        lines.append(
            "<div class='ef-seq' style='margin:3px 0;line-height:1.9'>"
            f"<span style='display:inline-block;min-width:150px;color:#55607a;font-size:12px'>{meta}</span>"
            f"{''.join(spans)}{shared}</div>"
        )
    foot = f"<div style='color:#55607a;font-size:12px'>{html.escape(note)}</div>" if note else ""
    return (
        "<div class='ef-tokens' style='margin:6px 0 10px;font-family:Helvetica,Arial,sans-serif'>"
        f"<div style='font-weight:600;font-size:13px;margin-bottom:2px'>{html.escape(title)}</div>"
        f"{''.join(lines)}{foot}</div>"
    )


def _background(value: float | None, scale: float) -> str:
    if value is None or scale == 0:
        return "background:#f1f3f6;"
    r, g, b = POSITIVE if value > 0 else NEGATIVE
    return f"background:rgba({r},{g},{b},{min(1.0, abs(value) / scale) * 0.85:.3f});"


def attention_patterns(model: nn.Module, tokens: Tensor, attention: str, head: int) -> np.ndarray | None:
    """``[n, T, T]`` attention pattern (query × key) of one head on token sequences ``[n, T]``, read at the
    TransformerLens hook ``<attention>.hook_pattern`` of the trained model; None where there is no such hook."""
    from ..baselines.neurons import neurons
    from ..errors import ConfigError

    try:
        acts = neurons(model, tokens, f"{attention}.hook_pattern")
    except ConfigError:
        return None
    n, t = tokens.shape[0], tokens.shape[1]
    values = acts.values.reshape(n, -1, t, t)
    return values[:, head].double().numpy() if head < values.shape[1] else None


def as_token_ids(inputs: Tensor) -> Tensor:
    """``[n, T]`` integer token ids of token inputs."""
    return torch.as_tensor(inputs).reshape(inputs.shape[0], -1).long()
