"""The settings every efffeat pass runs under, so that autodiff works on real models, and failures that name
the module, the op and the fix.

PyTorch takes fused kernels that have no forward-mode derivative or no batching rule, and one of its
forward-mode formulas is wrong. Inside `autodiff_context` efffeat switches them off and restores the user's
settings afterwards, on every exit path:

================================  ============================================================================
setting                           why
================================  ============================================================================
MHA fast path off                 ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` fused kernels
                                  (``aten::_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``)
                                  have no forward-mode derivative and, with a key padding mask, build nested
                                  tensors that ``torch.func`` cannot batch. With it off, padded positions hold
                                  computed values instead of the fast path's zeros: read valid positions only.
SDPA math backend                 the flash and memory-efficient attention kernels have no forward-mode derivative
mkldnn off (forward mode, LSTM)   ``aten::mkldnn_rnn_layer`` (float32 ``nn.LSTM``) has no forward-mode derivative
composite norms (forward mode)    in torch 2.13 the second-order forward-mode derivatives of ``F.layer_norm``
                                  (pytorch/pytorch#196700) and ``F.instance_norm`` are wrong, and
                                  ``native_group_norm_backward`` has no forward-mode derivative (forward-over-
                                  reverse); ``mean``/``var``/``rsqrt`` give the same values (to rounding) and
                                  correct derivatives of every order
================================  ============================================================================

These are process-wide PyTorch flags: another thread running the same model meanwhile sees them too.

A raw exception that escapes the context becomes an `UnsupportedModelError` naming the module that was running
(``"encoder.layers.0.self_attn (MultiheadAttention)"``), the op (``aten::…`` where PyTorch names one) and what
to do. `backward_failure_site` finds the module of a failure that happens in a backward pass, where no module
is running.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import DataError, EfffeatError, UnsupportedModelError

# Module types whose CPU kernels (mkldnn) lack a forward-mode derivative.
_MKLDNN_WITHOUT_FORWARD_AD = (nn.LSTM,)

_local = threading.local()  # .stack: modules entered and not yet left, innermost last (None: not tracking)

_OP = re.compile(r"aten::[A-Za-z0-9_.]+")


def _normalised(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    centred = x - x.mean(dims, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def layer_norm_composite(
    input: Tensor,
    normalized_shape: Any,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
    **__: Any,
) -> Tensor:
    """``F.layer_norm``: ``(x − mean) · rsqrt(var + eps) · weight + bias`` over the trailing normalised dims."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    y = _normalised(input, tuple(range(input.ndim - len(shape), input.ndim)), eps)
    return _affine(y, weight, bias, shape)


def group_norm_composite(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
    **__: Any,
) -> Tensor:
    """``F.group_norm`` on ``[N, C, *]``: statistics per example and group of channels (biased variance)."""
    grouped = input.reshape(input.shape[0], num_groups, -1)
    y = _normalised(grouped, (2,), eps).reshape(input.shape)
    return _affine(y, weight, bias, (1, -1) + (1,) * (input.ndim - 2))


def instance_norm_composite(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *_: Any,
    **__: Any,
) -> Tensor:
    """``F.instance_norm`` with the input's statistics: per example and channel over the spatial dims."""
    if not use_input_stats:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    y = _normalised(input, tuple(range(2, input.ndim)), eps)
    return _affine(y, weight, bias, (1, -1) + (1,) * (input.ndim - 2))


class _CompositeNorms(TorchFunctionMode):
    """Routes the norm functionals of the module table (whoever calls them) to their composite forms."""

    def __init__(self) -> None:
        super().__init__()
        self.composite = {
            F.layer_norm: layer_norm_composite,
            torch.layer_norm: layer_norm_composite,
            F.group_norm: group_norm_composite,
            torch.group_norm: group_norm_composite,
            F.instance_norm: instance_norm_composite,
        }

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.composite.get(func, func)(*args, **(kwargs or {}))


@contextmanager
def _backends(model: nn.Module, forward_ad: bool) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath, mkldnn = torch.backends.mha.get_fastpath_enabled(), torch.backends.mkldnn.enabled
    torch.backends.mha.set_fastpath_enabled(False)
    if forward_ad and any(isinstance(m, _MKLDNN_WITHOUT_FORWARD_AD) for m in model.modules()):
        torch.backends.mkldnn.enabled = False  # the attribute: mkldnn.flags() also resets (and warns about) TF32
    try:
        with sdpa_kernel(SDPBackend.MATH):  # saves and restores the user's backend choice
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.mkldnn.enabled = mkldnn


@contextmanager
def _track_modules() -> Iterator[None]:
    """Keep ``_local.stack``: the modules this thread has entered and not left (global module hooks)."""
    if getattr(_local, "stack", None) is not None:  # an enclosing context tracks already
        yield
        return
    me = threading.get_ident()
    _local.stack = []

    def enter(module: nn.Module, args: Any) -> None:
        if threading.get_ident() == me:
            _local.stack.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == me and _local.stack and _local.stack[-1] is module:
            _local.stack.pop()

    handles = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _local.stack = None


def forget_running_modules() -> None:
    """Clear the running-module stack after a failure that was handled (so a later one is not misattributed)."""
    if getattr(_local, "stack", None) is not None:
        _local.stack.clear()


def module_label(model: nn.Module, module: nn.Module | None) -> str | None:
    """``"path (Type)"`` of a module inside `model` (None for None)."""
    if module is None:
        return None
    path = next((p for p, m in model.named_modules() if m is module), None)
    where = "<root>" if path == "" else (path if path is not None else "<outside the model>")
    return f"{where} ({type(module).__name__})"


def running_module(model: nn.Module) -> str | None:
    """The innermost module running now (inside `autodiff_context`), as ``"path (Type)"``."""
    stack = getattr(_local, "stack", None)
    return module_label(model, stack[-1]) if stack else None


@contextmanager
def autodiff_context(model: nn.Module, forward_ad: bool = False, what: str = "the features") -> Iterator[None]:
    """Run efffeat's passes over `model` under the settings of the module table; restore the user's after.

    forward_ad: the block uses forward-mode AD (mkldnn off for LSTMs, composite norms). what: the
    computation, for error messages. Raw exceptions leave as `UnsupportedModelError` (module, op, fix);
    `EfffeatError`, `MemoryError` and warnings raised as errors pass unchanged. Nested contexts are cheap.
    """
    with ExitStack() as stack:
        stack.enter_context(_backends(model, forward_ad))
        if forward_ad:
            stack.enter_context(_CompositeNorms())
        stack.enter_context(_track_modules())
        try:
            yield
        except (EfffeatError, MemoryError, Warning):
            raise
        except Exception as e:
            raise failure_error(e, what, running_module(model)) from e


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class ModelRaised(DataError):
    """The model's own code raised while efffeat ran it (no known limit of PyTorch's autodiff): the model
    rejected its input. `efffeat.DualModel` rewords it with the batch it was running on."""


def failure_error(e: BaseException, what: str, site: str | None) -> EfffeatError:
    """`failure_message` as an error: `UnsupportedModelError` for the known limits of PyTorch's autodiff (no
    derivative, no forward mode, no vmap batching rule, Functions without backward or setup_context), else
    `ModelRaised`."""
    message = failure_message(e, what, site)
    return ModelRaised(message) if _kind(e) is None else UnsupportedModelError(message)


def _kind(e: BaseException) -> str | None:
    """Which known limit of PyTorch's autodiff an exception reports (None: none of them)."""
    text = str(e)
    lower = text.lower()
    if "setup_context" in text:
        return "setup_context"
    if "forward ad" in lower or "forward-mode" in lower or "forward mode" in lower:
        return "forward"
    if "must implement either the backward" in text:
        return "backward"
    if "derivative for" in text and "not implemented" in text:
        return "derivative"
    if "vmap" in text or "Batching rule" in text:
        return "vmap"
    return None


def failure_message(e: BaseException, what: str, site: str | None, hint: str | None = None) -> str:
    """One sentence: what failed, where (module), on which op, and the fix, from PyTorch's exception.

    hint: the fix to give when the failure is none of the known kinds (default: register a rule).
    """
    text = str(e)
    op_match = _OP.search(text)
    op = op_match.group(0) if op_match else None
    known = _kind(e)
    if known == "setup_context":
        kind = "a custom autograd.Function cannot run under torch.func transforms (it has no setup_context)"
        fix = (
            "give it a setup_context staticmethod (and a jvp for forward mode); meanwhile order='path' and "
            "EffectiveFeatures.completeness() need reverse mode only"
        )
    elif known == "forward":
        kind = f"the op {op or '(unnamed)'} has no forward-mode derivative in PyTorch {torch.__version__}"
        fix = (
            "order='nlo' and DualModel.completeness/predict/directional need forward mode: use order='path' "
            "(reverse mode only) and EffectiveFeatures.completeness(), or replace the op"
        )
    elif known == "backward":
        kind = "a custom autograd.Function has no backward"
        fix = "the model has no gradient features through it: give the Function a backward, or replace it"
    elif known == "derivative":
        kind = f"the op {op or '(unnamed)'} has no derivative"
        fix = "the model has no gradient features through it: replace the op"
    elif known == "vmap":
        kind = f"torch.func.vmap cannot batch {op or 'the forward'}"
        fix = "register a rule for the module with @ef.register_rule(ModuleType)"
    else:
        kind = f"PyTorch raised on {op}" if op else "PyTorch raised"
        fix = hint or "register a rule for the module with @ef.register_rule(ModuleType), or report the failure"
    where = f" in {site}" if site else ""
    return f"efffeat could not compute {what}{where}: {kind} ({first_line(e)}); {fix}"


def backward_failure_site(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Rerun a computation whose backward pass failed, and name the module where it fails.

    Gradient hooks on every module's inputs and outputs show how far the backward pass got: the failing module
    is the innermost one whose output received its gradient and whose inputs did not.
    """
    reached: set[int] = set()  # id(module) whose output got a gradient
    passed: set[int] = set()  # id(module) whose input got a gradient
    has_grad_input: set[int] = set()
    modules: dict[int, tuple[str, nn.Module]] = {id(m): (p, m) for p, m in model.named_modules()}
    handles = []

    def mark(into: set[int], key: int) -> Callable[[Tensor], None]:
        return lambda grad: into.add(key)

    def watch(tensors: Any, into: set[int], key: int) -> bool:
        found = False
        for t in tree_leaves(tensors):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(mark(into, key))
                found = True
        return found

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) in modules and watch(args, passed, id(module)):
            has_grad_input.add(id(module))

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in modules:
            watch(output, reached, id(module))

    for _, m in model.named_modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        run()
        return None
    except Exception:
        stuck = [k for k in reached if k not in passed]
        # prefer modules with inputs that need a gradient (a first layer's input never gets one), then the deepest
        stuck.sort(key=lambda k: (k in has_grad_input, modules[k][0].count(".") + bool(modules[k][0])), reverse=True)
        return module_label(model, modules[stuck[0]][1]) if stuck else None
    finally:
        for h in handles:
            h.remove()
