"""SPEC §2-3 in float64 NumPy, independent of the library: the tests' ground truth.

`round_to` rounds an f64 array to the layer dtype at the SPEC's rounding points (identity for
f32, where those roundings are identities).
"""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


NON_GATED = {"silu": silu, "gelu": gelu, "relu2": lambda x: np.maximum(x, 0.0) ** 2}


def swiglu_oai(gate, up, alpha, limit):
    gate = np.minimum(gate, limit)
    return gate * sigmoid(alpha * gate) * (np.clip(up, -limit, limit) + 1)


def silu_clamp(gate, up, alpha, limit):
    return np.minimum(silu(gate), limit) * np.clip(up, -limit, limit)


def silu_preclamp(gate, up, alpha, limit):
    return silu(np.minimum(gate, limit)) * np.clip(up, -limit, limit)


GATED = {
    "silu": lambda gate, up, alpha, limit: silu(gate) * up,
    "gelu": lambda gate, up, alpha, limit: gelu(gate) * up,
    "gelu_tanh": lambda gate, up, alpha, limit: gelu_tanh(gate) * up,
    "swiglu_oai": swiglu_oai,
    "silu_clamp": silu_clamp,
    "silu_preclamp": silu_preclamp,
}


def round_f16(x):
    return x.astype(np.float16).astype(np.float64)


def no_rounding(x):
    return x


def activate(g1, activation="silu", gated=True, gate_up_layout="halves", gemm1_alpha=None,
             gemm1_limit=None, **_):
    """SPEC §3 on one route's rounded GEMM1 output g1 [N1]."""
    if not gated:
        return NON_GATED[activation](g1)
    if gate_up_layout == "halves":
        gate, up = np.split(g1, 2)
    else:
        gate, up = g1[0::2], g1[1::2]
    return GATED[activation](gate, up, gemm1_alpha, gemm1_limit)


def moe(hidden, w13, w2, topk_ids, topk_weights, b13=None, b2=None, round_to=no_rounding,
        routed_scaling_factor=1.0, apply_router_weight_on_input=False, no_combine=False,
        no_combine_keep_router_weight=False, **activation):
    """SPEC §2: out [M, H], or [M, K, H] with no_combine, in float64 (rounded per round_to)."""
    tokens, top_k = topk_ids.shape
    experts, _, hidden_size = w13.shape
    b13 = np.zeros(w13.shape[:2]) if b13 is None else b13
    b2 = np.zeros((experts, hidden_size)) if b2 is None else b2
    routes = np.zeros((tokens, top_k, hidden_size))
    for m in range(tokens):
        for k in range(top_k):
            e, w = topk_ids[m, k], topk_weights[m, k]
            if e < 0:
                continue  # a dropped route contributes exactly zero
            on_input = w if apply_router_weight_on_input else 1.0
            g1 = round_to(on_input * (w13[e] @ hidden[m] + b13[e]))
            a = round_to(activate(g1, **activation))
            if no_combine:
                on_output = w if no_combine_keep_router_weight else 1.0
            else:
                on_output = 1.0 if apply_router_weight_on_input else w
            routes[m, k] = round_to((w2[e] @ a + b2[e]) * on_output)
    if no_combine:
        return routes
    return round_to(routed_scaling_factor * routes.sum(axis=1))


def moe_lora(hidden, w13, w2, topk_ids, topk_weights, adapters, token_adapter,
             round_to=no_rounding, routed_scaling_factor=1.0, apply_router_weight_on_input=False,
             gated=True, gate_up_layout="halves", **activation):
    """SPEC §2 with the LoRA deltas of SPEC §7 (no biases, combined output): token m uses
    adapters[token_adapter[m]] (None or -1: none), each a dict of gate_up_a, gate_up_b,
    down_a, down_b (float64, r-padded) and scaling."""
    tokens, top_k = topk_ids.shape
    routes = np.zeros((tokens, top_k, hidden.shape[1]))
    for m in range(tokens):
        a = token_adapter[m]
        lora = adapters[a] if a >= 0 else None
        for k in range(top_k):
            e, w = topk_ids[m, k], topk_weights[m, k]
            if e < 0:
                continue
            g1 = w13[e] @ hidden[m]
            if lora is not None:
                ea = 0 if lora["gate_up_a"].shape[0] == 1 else e
                t = round_to(lora["gate_up_a"][ea] @ hidden[m])
                r = lora["gate_up_b"].shape[2]
                b = lora["gate_up_b"][e]
                if not gated:
                    g1 = g1 + lora["scaling"] * (b @ t)
                else:
                    up = (np.arange(len(g1)) % 2 == 1) if gate_up_layout == "interleaved" \
                        else (np.arange(len(g1)) >= len(g1) // 2)
                    g1 = g1 + lora["scaling"] * np.where(up, b @ t[r:], b @ t[:r])
            on_input = w if apply_router_weight_on_input else 1.0
            g1 = round_to(on_input * g1)
            act = round_to(activate(g1, gated=gated, gate_up_layout=gate_up_layout,
                                    **activation))
            y = w2[e] @ act
            if lora is not None:
                eb = 0 if lora["down_b"].shape[0] == 1 else e
                u = round_to(lora["down_a"][e] @ act)
                y = y + lora["scaling"] * (lora["down_b"][eb] @ u)
            routes[m, k] = round_to(y * (1.0 if apply_router_weight_on_input else w))
    return round_to(routed_scaling_factor * routes.sum(axis=1))


def relative_error(got, want):
    """‖got − want‖ / ‖want‖ (Frobenius); a NaN anywhere gives NaN, which fails any bound."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)
