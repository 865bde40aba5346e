"""Named readouts for sequence models: what scalar of a language model's output the features explain.

Each function returns a readout ``readout(output, batch) -> [N] | [N, K]`` to pass as
``ef.DualModel(model, init, readout=...)``. The model's output is its logits ``[N, T, V]`` (or an object with
``.logits``, as Hugging Face models return); `batch` is what the data yields — a token tensor ``[N, T]``, or a
tuple ``(tokens, answers[, counterfactuals])`` whose columns name the tokens to read per example.

==========================================  =====================================================  =========
readout                                     value per example                                       shape
==========================================  =====================================================  =========
``logit(token, position=-1)``               the logit of `token` at `position`                      ``[N]``
``logit(position=-1)``                      the logit of each example's answer (``batch[1]``)       ``[N]``
``logit_diff(correct, counterfactual)``     logit of the correct minus the counterfactual token     ``[N]``
``position_loss()``                         next-token cross-entropy at every position              ``[N, T-1]``
``position_loss(position=t)``               the loss of predicting token t + 1 from position t      ``[N]``
==========================================  =====================================================  =========

Example::

    dual = ef.DualModel(model, init, readout=ef.readouts.logit_diff(position=-1))   # data (tokens, right, wrong)
    dual = ef.DualModel(model, init, readout=ef.readouts.position_loss())           # one component per position
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._check import integer
from .errors import ConfigError, ReadoutError

ReadoutFn = Callable[[Any, Any], Tensor]


def _logits(output: Any) -> Tensor:
    """``[N, T, V]`` logits of a model output (a tensor, or an object with ``.logits``)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ReadoutError(
            f"a sequence readout reads logits [N, T, V], and the model returned {got}; pass a model that "
            "returns per-position logits, or write a readout of your own: readout=lambda out, batch: ..."
        )
    return logits


def _check_position(position: Any) -> int:
    if isinstance(position, bool) or not isinstance(position, int):
        raise ConfigError(f"position must be an integer (negative counts from the end), got {position!r}")
    return position


def _position(length: int, position: int) -> int:
    """`position` in ``0..length-1`` (negative counts from the end)."""
    if not -length <= position < length:
        raise ReadoutError(f"position={position} is out of range for sequences of {length} positions")
    return position % length


def _tokens(batch: Any, token: int | None, column: int, what: str, n: int) -> Tensor:
    """``[N]`` token ids: `token` for every example, or column `column` of the batch tuple."""
    if token is not None:
        return torch.full((n,), token, dtype=torch.long)
    if not isinstance(batch, tuple | list) or len(batch) <= column or not isinstance(batch[column], Tensor):
        raise ReadoutError(
            f"the {what} token is read from the data, and the batch has no column {column}: pass data as "
            f"(tokens, answers{', counterfactuals' if column == 2 else ''}) or give the token id"
        )
    ids = batch[column]
    if ids.shape != (n,) or ids.is_floating_point():
        raise ReadoutError(f"the {what} tokens (batch[{column}]) must be integer ids [N], got {tuple(ids.shape)}")
    return ids.long()


def _picked(logits: Tensor, position: int, ids: Tensor) -> Tensor:
    """``[N]``: ``logits[n, position, ids[n]]``."""
    at = logits[:, position]
    if bool((ids < 0).any()) or bool((ids >= at.shape[1]).any()):
        raise ReadoutError(f"token ids must be in 0..{at.shape[1] - 1} (the vocabulary of the logits)")
    return at.gather(1, ids.to(at.device)[:, None])[:, 0]


def _named(fn: ReadoutFn, name: str) -> ReadoutFn:
    fn.__name__ = name
    return fn


def logit(token: int | None = None, position: int = -1) -> ReadoutFn:
    """The logit of `token` at `position` (``[N]``); ``token=None`` reads each example's answer ``batch[1]``."""
    if token is not None:
        integer("token", token, minimum=0)
    _check_position(position)

    def readout(output: Any, batch: Any) -> Tensor:
        logits = _logits(output)
        ids = _tokens(batch, token, 1, "answer", logits.shape[0])
        return _picked(logits, _position(logits.shape[1], position), ids)

    return _named(readout, f"logit[{'answer' if token is None else token}]@{position}")


def logit_diff(correct: int | None = None, counterfactual: int | None = None, position: int = -1) -> ReadoutFn:
    """``logit(correct) − logit(counterfactual)`` at `position` (``[N]``): how much the model prefers the right
    token to a counterfactual one. None reads them from the data: correct ``batch[1]``, counterfactual
    ``batch[2]``."""
    for name, value in (("correct", correct), ("counterfactual", counterfactual)):
        if value is not None:
            integer(name, value, minimum=0)
    _check_position(position)

    def readout(output: Any, batch: Any) -> Tensor:
        logits = _logits(output)
        n, at = logits.shape[0], _position(logits.shape[1], position)
        right = _picked(logits, at, _tokens(batch, correct, 1, "correct", n))
        wrong = _picked(logits, at, _tokens(batch, counterfactual, 2, "counterfactual", n))
        return right - wrong

    right = "answer" if correct is None else str(correct)
    wrong = "counterfactual" if counterfactual is None else str(counterfactual)
    return _named(readout, f"logit_diff[{right}-{wrong}]@{position}")


def position_loss(position: int | None = None) -> ReadoutFn:
    """Next-token cross-entropy ``−log p(x_{t+1} | x_≤t)`` at every position t (``[N, T − 1]``, one readout
    component per position), or at one `position` (``[N]``). The next tokens are the inputs shifted by one;
    data ``(tokens, targets [N, T])`` gives the targets of every position instead (``[N, T]``)."""
    if position is not None:
        _check_position(position)

    def readout(output: Any, batch: Any) -> Tensor:
        logits = _logits(output)
        tokens = batch[0] if isinstance(batch, tuple | list) else batch
        targets = batch[1] if isinstance(batch, tuple | list) and len(batch) > 1 else None
        if isinstance(targets, Tensor) and targets.shape == logits.shape[:2] and not targets.is_floating_point():
            scored, wanted = logits, targets.long()
        elif isinstance(tokens, Tensor) and tokens.shape == logits.shape[:2] and not tokens.is_floating_point():
            scored, wanted = logits[:, :-1], tokens[:, 1:].long()
        else:
            raise ReadoutError(
                "position_loss needs the token ids [N, T] of the batch (or targets [N, T] as batch[1]) to score "
                f"the logits {tuple(logits.shape)} against"
            )
        if scored.shape[1] == 0:
            raise ReadoutError("sequences of one token have no next token to predict")
        losses = -F.log_softmax(scored, dim=-1).gather(2, wanted.to(scored.device)[..., None])[..., 0]
        if position is None:
            return losses
        return losses[:, _position(losses.shape[1], position)]

    return _named(readout, "position_loss" if position is None else f"position_loss@{position}")
