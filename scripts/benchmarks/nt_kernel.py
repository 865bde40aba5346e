"""neural-tangents' empirical NTK of the peers benchmark's MLP, run by ``peers.py --nt PYTHON`` in an interpreter
that has JAX and neural-tangents (never imported by the torch process; recipe in docs/BENCHMARKS.md).

    PYTHON nt_kernel.py in.npz out.npz [repeat]

in.npz: ``x [N, 64]`` and the layers' ``W{i}`` (torch layout ``[out, in]``) and ``b{i}``; out.npz: the kernel of
each implementation (structured derivatives, Jacobian contraction, NTK-vector products) and its times (first
call, which compiles, and the best of `repeat` after it). The tanh MLP is written in ``jax.numpy`` (``stax`` has
no tanh); ``empirical_ntk_fn`` takes any ``apply_fn``.
"""

import sys
import time
import types

import numpy as np

# The `experimental` subpackage is TensorFlow interop and would import tensorflow at package import.
sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402

IMPLEMENTATIONS = {"jacobian_contraction": 1, "ntk_vector_products": 2, "structured_derivatives": 3}


def apply_fn(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b
        if i + 1 < len(params):
            h = jnp.tanh(h)
    return h


def main(src: str, dst: str, repeat: int) -> None:
    z = np.load(src)
    x = jnp.asarray(z["x"])
    layers = len([k for k in z.files if k.startswith("W")])
    params = [(jnp.asarray(z[f"W{i}"]), jnp.asarray(z[f"b{i}"])) for i in range(layers)]
    out = {}
    for name, implementation in IMPLEMENTATIONS.items():
        f = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0, implementation=implementation))
        start = time.perf_counter()
        k = f(x, None, params).block_until_ready()
        first = time.perf_counter() - start
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            k = f(x, None, params).block_until_ready()
            best = min(best, time.perf_counter() - start)
        out[name] = np.asarray(k).reshape(x.shape[0], x.shape[0])
        out[f"t_{name}"] = np.array([first, best])
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
