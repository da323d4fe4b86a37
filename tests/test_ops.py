"""Every shared op of diffusers_ext/ops.py and merge.py against a small case worked out by hand.

The method tests compare whole processors with dense references; these pin each op on its own,
with expected values written as numbers or closed forms (python floats, no torch op under test),
so a bug in a shared op cannot move a reference built on the same op."""

import math

import pytest
import torch
from helpers import assert_rounded_from_exact

from diffusers_ext import merge, ops

LN2, LN3 = math.log(2.0), math.log(3.0)
F64 = dict(dtype=torch.float64)


def t(values, *shape):
    """A float64 tensor of `values` in `shape`."""
    return torch.tensor(values, **F64).reshape(*shape)


def close(got, expected, tol=1e-12):
    torch.testing.assert_close(got, torch.as_tensor(expected, **F64).reshape(got.shape).to(got.dtype),
                               rtol=tol, atol=tol)


def test_upcast_dtype():
    assert [ops.upcast_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == \
        [torch.float32, torch.float32, torch.float32, torch.float64]


def test_sdpa_hand_case():
    """logits (ln 3, 0) -> weights (3/4, 1/4) over the values (1, 2) and (3, 4)."""
    q, k, v = t([1, 0], 1, 1, 1, 2), t([1, 0, 0, 1], 1, 1, 2, 2), t([1, 2, 3, 4], 1, 1, 2, 2)
    close(ops.sdpa(q, k, v, LN3), [1.5, 2.5])
    close(ops.sdpa(q, k, v, 0.0), [2.0, 3.0])                            # scale 0: the mean


# Three keys / values e1, e2, 0 and two agents e1, e2 (d = 2): with gather scale ln 2 the agents
# weigh the keys (2, 1, 1) / 4 and (1, 2, 1) / 4, so F = [(1/2, 1/4), (1/4, 1/2)]; the query 2 e1
# reads them with scale ln 3 as (9, 1) / 10: (0.475, 0.275); the zero query averages them.
AGENT_Q = t([2, 0, 0, 0, 0, 2], 1, 1, 3, 2)
AGENT_KV = t([1, 0, 0, 1, 0, 0], 1, 1, 3, 2)
AGENTS = t([1, 0, 0, 1], 1, 1, 2, 2)
AGENT_OUT = [[0.475, 0.275], [0.375, 0.375], [0.275, 0.475]]


def test_agent_attention_hand_case():
    close(ops.agent_attention(AGENT_Q, AGENT_KV, AGENT_KV, AGENTS, LN2, LN3), AGENT_OUT)
    # the scales are not interchangeable: gather ln 3 -> F = (0.6, 0.2), (0.2, 0.6); read ln 2 -> (4, 1) / 5
    close(ops.agent_attention(AGENT_Q, AGENT_KV, AGENT_KV, AGENTS, LN3, LN2)[0, 0, 0], [0.52, 0.28])
    # shortcut: + c V, or + c V_s
    with_v = [[a + 0.5 * b for a, b in zip(row, vrow)] for row, vrow in zip(AGENT_OUT, [[1, 0], [0, 1], [0, 0]])]
    close(ops.agent_attention(AGENT_Q, AGENT_KV, AGENT_KV, AGENTS, LN2, LN3, 0.5), with_v)
    other = torch.full((1, 1, 3, 2), 2.0, **F64)
    close(ops.agent_attention(AGENT_Q, AGENT_KV, AGENT_KV, AGENTS, LN2, LN3, 0.5, other),
          [[a + 1.0 for a in row] for row in AGENT_OUT])


def test_tokens_to_grid_and_back():
    x = torch.arange(12, **F64).reshape(1, 6, 2)                         # 6 tokens, 2 channels
    image, lead = ops.tokens_to_grid(x, (2, 3))
    assert image.shape == (1, 2, 2, 3) and tuple(lead) == (1,)
    close(image[0, 0], [[0, 2, 4], [6, 8, 10]])                          # channel 0, row-major
    close(image[0, 1], [[1, 3, 5], [7, 9, 11]])
    assert torch.equal(ops.grid_to_tokens(image, lead), x)


def test_pool_on_grid_hand_cases():
    x = torch.arange(16, **F64).reshape(1, 16, 1)                        # 4 x 4 grid, values row-major
    close(ops.pool_on_grid(x, (4, 4), (2, 2)), [2.5, 4.5, 10.5, 12.5])
    close(ops.pool_on_grid(x, (4, 4), (1, 1)), [7.5])
    # adaptive cells that overlap: 3 columns -> 2 cells spanning columns {0, 1} and {1, 2}
    close(ops.pool_on_grid(t([0, 1, 2], 1, 3, 1), (1, 3), (1, 2)), [0.5, 1.5])
    # a 2 x 4 grid to 1 x 2, with leading dims (B, h) and 2 channels kept apart
    y = torch.stack([torch.arange(8, **F64), 10 * torch.arange(8, **F64)], -1).expand(2, 3, 8, 2)
    pooled = ops.pool_on_grid(y, (2, 4), (1, 2))
    assert pooled.shape == (2, 3, 2, 2)
    close(pooled[1, 2], [[2.5, 25.0], [4.5, 45.0]])                      # mean of (0, 1, 4, 5), of (2, 3, 6, 7)
    # per-head tokens pooled through their token-major view: the same cells, heads and channels kept apart
    heads = torch.stack([torch.arange(8, **F64), 10 * torch.arange(8, **F64)], 0)     # head 0: 0..7, head 1: x 10
    tokens_major = heads.T.reshape(1, 8, 2, 1).expand(1, 8, 2, 2).contiguous()   # (B, N, h, d), d = 2 equal channels
    pooled = ops.pool_heads_on_grid(tokens_major.transpose(1, 2), (2, 4), (1, 2))
    assert pooled.shape == (1, 2, 2, 2)
    close(pooled[0, 0], [[2.5, 2.5], [4.5, 4.5]])
    close(pooled[0, 1], [[25.0, 25.0], [45.0, 45.0]])


def test_grid_depthwise_conv_hand_case():
    rng = torch.random.get_rng_state()
    conv = ops.GridDepthwiseConv(1, 3)
    assert torch.equal(torch.random.get_rng_state(), rng)               # zero init draws nothing
    x = t([1, 2, 4], 1, 3, 1)                                            # a 1 x 3 grid, one channel
    close(conv(x, (1, 3)), [0, 0, 0])
    with torch.no_grad():
        conv.conv.weight.fill_(1.0)
        conv.conv.bias.fill_(0.5)
    # all-ones 3 x 3 kernel, zero padding: each token sums its row neighbours
    close(conv(x, (1, 3)), [3.5, 7.5, 6.5], tol=1e-6)
    assert conv(x, (1, 3)).dtype == torch.float64
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 0, 1, 2] = 1.0                              # weight on the right neighbour
    close(conv(t([1, 2, 4, 8, 16, 32], 1, 6, 1), (2, 3)), [2.5, 4.5, 0.5, 16.5, 32.5, 0.5], tol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        ops.GridDepthwiseConv(2, 4)


def test_grid_depthwise_conv_random_init_and_no_bias():
    """zero_init=False: torch's random init, applied per channel with zero padding (checked by a loop);
    bias=False: no bias either way."""
    torch.manual_seed(0)
    conv = ops.GridDepthwiseConv(2, 3, zero_init=False).double()
    weight, bias = conv.conv.weight[:, 0], conv.conv.bias                 # (2, 3, 3), (2,)
    assert weight.abs().min() > 0 and bias.abs().min() > 0
    x = torch.randn(1, 6, 2, **F64)                                      # a 2 x 3 grid, 2 channels
    image = x[0].reshape(2, 3, 2)
    expected = torch.zeros(2, 3, 2, **F64)
    for i in range(2):
        for j in range(3):
            for c in range(2):
                expected[i, j, c] = bias[c] + sum(weight[c, di + 1, dj + 1] * image[i + di, j + dj, c]
                                                  for di in (-1, 0, 1) for dj in (-1, 0, 1)
                                                  if 0 <= i + di < 2 and 0 <= j + dj < 3)
    close(conv(x, (2, 3)), expected.reshape(6, 2), tol=1e-12)
    close(conv(x, (2, 3), residual=True), x[0] + expected.reshape(6, 2), tol=1e-12)   # x + DWConv(x), one conv
    conv5 = ops.GridDepthwiseConv(2, 5, zero_init=False).double()        # the identity sits at the 5 x 5 centre
    close(conv5(x, (2, 3), residual=True), x + conv5(x, (2, 3)), tol=1e-12)
    assert ops.GridDepthwiseConv(2).conv.kernel_size == (3, 3)           # the default: 3 x 3
    assert ops.GridDepthwiseConv(2, 3, bias=False).conv.bias is None
    assert ops.GridDepthwiseConv(2, 3, zero_init=False, bias=False).conv.bias is None


def test_key_instance_norm_hand_case():
    """Per channel over the tokens: (1, 3) has mean 2 and biased variance 1; eps 1 -> (x - 2) / sqrt 2."""
    k = t([1, 5, 3, 5], 1, 1, 2, 2)                                    # channel 0: (1, 3), channel 1: (5, 5)
    close(ops.key_instance_norm(k), [[-0.5**0.5, 0.0], [0.5**0.5, 0.0]])
    close(ops.key_instance_norm(k, eps=3.0), [[-0.5, 0.0], [0.5, 0.0]])
    assert ops.key_instance_norm(k.bfloat16()).dtype == torch.bfloat16
    # scale: the norm of k * scale; channel 0 times 2 -> (2, 6): mean 4, variance 4 -> (x - 4) / sqrt 5
    close(ops.key_instance_norm(k, scale=t([2, 3], 1, 2)), [[-2 / 5**0.5, 0.0], [2 / 5**0.5, 0.0]])
    assert ops.key_instance_norm(k.bfloat16(), scale=t([2, 3], 1, 2)).dtype == torch.bfloat16
    close(ops.key_instance_norm(k[0], scale=t([2, 3], 1, 2)), [[-2 / 5**0.5, 0.0], [2 / 5**0.5, 0.0]])  # 3-D: over N


def test_silu_derivative_hand_case_and_finite_differences():
    close(ops.silu_derivative(t([0.0], 1)), [0.5])
    z = t([-3.0, -0.7, 0.4, 2.5], 4)
    h = 1e-6
    silu = lambda x: x / (1 + math.exp(-x))  # noqa: E731
    close(ops.silu_derivative(z), [(silu(x + h) - silu(x - h)) / (2 * h) for x in z.tolist()], tol=1e-8)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_ttt_inner_step_hand_case():
    """d = 1, one token k = 1, v = 0, W1 = W2 = 1: z = 1, a = SiLU(1), e = a s / N,
    G2 = a e, G1 = e SiLU'(1) (SiLU'(1) = sig(1) (2 - sig(1)))."""
    a, dsilu = _sig(1.0), _sig(1.0) * (2 - _sig(1.0))
    one = t([1.0], 1, 1)
    for tokens, scale in ((1, 1.0), (2, 1.0), (2, 3.0)):               # identical tokens: the mean is one token's
        k, v = torch.ones(1, 1, tokens, 1, **F64), torch.zeros(1, 1, tokens, 1, **F64)
        w1, w2 = ops.ttt_inner_step(k, v, one, one, scale)
        e = a * scale
        close(w1, [1 - e * dsilu])
        close(w2, [1 - a * e])
    w1, w2 = ops.ttt_inner_step(torch.ones(1, 1, 1, 1, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16),
                                one.bfloat16(), one.bfloat16(), 1.0)
    assert w1.dtype == w2.dtype == torch.float32


def test_ttt_read_and_attention_hand_case():
    q = t([2.0], 1, 1, 1, 1)
    close(ops.ttt_read(q, t([0.5], 1, 1, 1), t([3.0], 1, 1, 1)), [3 * _sig(1.0)])       # SiLU(2 * 0.5) * 3
    assert ops.ttt_read(q.bfloat16(), t([0.5], 1, 1, 1).float(), t([3.0], 1, 1, 1).float()).dtype == torch.bfloat16
    # ttt_attention = one step on (k, v), then the read: W1' = 1 - SiLU(1) SiLU'(1), W2' = 1 - SiLU(1)^2
    a, dsilu = _sig(1.0), _sig(1.0) * (2 - _sig(1.0))
    w1, w2 = 1 - a * dsilu, 1 - a * a
    out = ops.ttt_attention(q, t([1.0], 1, 1, 1, 1), t([0.0], 1, 1, 1, 1), t([1.0], 1, 1, 1), t([1.0], 1, 1, 1), 1.0)
    close(out, [2 * w1 * _sig(2 * w1) * w2])


def test_attention_with_bias_hand_case():
    """Zero logits, bias (0, ln 3): weights (1/4, 3/4) over the values 4 and 8."""
    q, k, v = torch.zeros(1, 1, 1, 2, **F64), t([1, 0, 0, 1], 1, 1, 2, 2), t([4, 8], 1, 1, 2, 1)
    close(ops.attention_with_bias(q, k, v, 1.0, t([0.0, LN3], 1, 1, 1, 2)), [7.0])
    close(ops.attention_with_bias(q, k, v, 1.0, None), [6.0])
    # the scale acts with and without a bias: q = e1, scale ln 3 -> logits (ln 3, 0) [+ (0, ln 3)]
    q = t([1.0, 0.0], 1, 1, 1, 2)
    close(ops.attention_with_bias(q, k, v, LN3, None), [5.0])
    close(ops.attention_with_bias(q, k, v, LN3, t([0.0, LN3], 1, 1, 1, 2)), [6.0])
    got = ops.attention_with_bias(q, k, v, LN3, torch.tensor([0.0, LN3]).reshape(1, 1, 1, 2))  # fp32 bias
    assert got.dtype == torch.float64
    close(got, [6.0], tol=1e-7)


def test_mediator_attention_hand_case():
    """Zero queries and mediators: only the biases weigh. B1 rows (0, ln 3), (ln 3, 0) -> mediators
    gather 7 and 5 from the values (4, 8); B2 (ln 3, 0) -> the token reads 3/4 7 + 1/4 5 = 6.5."""
    q, mediators = torch.zeros(1, 1, 1, 2, **F64), torch.zeros(1, 1, 2, 2, **F64)
    k, v = t([1, 0, 0, 1], 1, 1, 2, 2), t([4, 8], 1, 1, 2, 1)
    b1, b2 = t([0, LN3, LN3, 0], 1, 1, 2, 2), t([LN3, 0], 1, 1, 1, 2)
    close(ops.mediator_attention(q, k, v, mediators, 1.0, b1, b2), [6.5])
    close(ops.mediator_attention(q, k, v, mediators, 1.0, b1, None), [6.0])             # reads uniformly
    close(ops.mediator_attention(q, k, v, mediators, 1.0, None, b2), [6.0])             # both gather 6
    # each bias alone counts, and so does the scale: q = T1 = e1, T2 = 0, scale ln 3. Without biases
    # T1 gathers (3/4, 1/4) -> 5, T2 uniformly -> 6, and q reads them (3/4, 1/4) -> 5.25.
    q, mediators = t([1.0, 0.0], 1, 1, 1, 2), t([1, 0, 0, 0], 1, 1, 2, 2)
    b1, b2 = t([0, LN3, 0, LN3], 1, 1, 2, 2), t([0, LN3], 1, 1, 1, 2)
    close(ops.mediator_attention(q, k, v, mediators, LN3), [5.25])
    close(ops.mediator_attention(q, k, v, mediators, LN3, b1, None), [6.25])            # gather 6, 7
    close(ops.mediator_attention(q, k, v, mediators, LN3, None, b2), [5.5])             # read uniformly
    close(ops.mediator_attention(q, k, v, mediators, LN3, b1, b2), [6.5])
    # no biases: agent attention with one scale (gather and read ln 2: F as above, read (4, 1) / 5)
    close(ops.mediator_attention(AGENT_Q, AGENT_KV, AGENT_KV, AGENTS, LN2)[0, 0, 0], [0.45, 0.3])


def test_interpolated_bias_hand_cases():
    """Half-pixel linear interpolation of 2 values (a, b) to 4: (a, 3a/4 + b/4, a/4 + 3b/4, b)."""
    a, b, c, base = 1.0, 5.0, -2.0, 10.0
    table, rows, cols = t([base], 1, 1, 1, 1, 1), t([a, b], 1, 1, 1, 2), t([c], 1, 1, 1, 1)
    bias = ops.interpolated_bias(table, rows, cols, (1, 1), (4, 3))
    assert bias.shape == (1, 1, 12)
    row_terms = [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    close(bias, [base + r + c for r in row_terms for _ in range(3)])
    # over the mediator grid: a 2 x 1 table of mediators (p, q) -> 4 x 1 mediators, one token
    p, q_ = 2.0, 6.0
    zero = lambda *s: torch.zeros(*s, **F64)  # noqa: E731
    bias = ops.interpolated_bias(t([p, q_], 1, 2, 1, 1, 1), zero(1, 2, 1, 1), zero(1, 2, 1, 1), (4, 1), (1, 1))
    close(bias, [p, 0.75 * p + 0.25 * q_, 0.25 * p + 0.75 * q_, q_])
    # columns: (c0, c1) over a width of 4, added along the columns of every row
    bias = ops.interpolated_bias(zero(1, 1, 1, 1, 1), zero(1, 1, 1, 1), t([a, b], 1, 1, 1, 2), (1, 1), (2, 4))
    close(bias, row_terms + row_terms)


def test_rms_norm_hand_case():
    x = t([3.0, 4.0], 1, 2)                                              # mean square 12.5
    close(ops.rms_norm(x, eps=0.0), [3 / 12.5**0.5, 4 / 12.5**0.5])
    close(ops.rms_norm(x, t([2.0, -1.0], 2)), [6 / 12.50001**0.5, -4 / 12.50001**0.5])
    assert ops.rms_norm(x.bfloat16()).dtype == torch.bfloat16


def test_diff_lambda_and_lambda_init_hand_cases():
    """exp(lq1 . lk1) - exp(lq2 . lk2) + l_init with dots 2 and 1; l_init = 0.8 - 0.6 exp(-0.3 depth)."""
    got = ops.diff_lambda(t([1.0, 0.5], 2), t([1.0, 2.0], 2), t([0.5, 0.0], 2), t([2.0, 7.0], 2), 0.25)
    close(got, math.e**2 - math.e + 0.25)
    low = ops.diff_lambda(*(x.bfloat16() for x in (t([1.0, 0.5], 2), t([1.0, 2.0], 2), t([0.5, 0.0], 2),
                                                    t([2.0, 7.0], 2))), 0.25)
    assert low.dtype == torch.float32
    assert ops.lambda_init_for_depth(0) == pytest.approx(0.2, abs=1e-15)
    assert ops.lambda_init_for_depth(1) == pytest.approx(0.3555090, abs=1e-7)     # 0.8 - 0.6 * 0.7408182
    assert ops.lambda_init_for_depth(10) == pytest.approx(0.7701277, abs=1e-7)    # 0.8 - 0.6 * 0.0497871


def test_differential_attention_hand_case():
    """Positive keys weigh the values (4, 8) as (3/4, 1/4) -> 5, negative keys as (1/4, 3/4) -> 7."""
    q = t([1.0, 0.0], 1, 1, 1, 2)
    k_pos, k_neg, v = t([1, 0, 0, 0], 1, 1, 2, 2), t([0, 0, 1, 0], 1, 1, 2, 2), t([4, 8], 1, 1, 2, 1)
    close(ops.differential_attention(q, k_pos, k_neg, v, LN3, 0.5), [5 - 0.5 * 7])
    close(ops.differential_attention(q, k_pos, k_neg, v, LN3, torch.tensor(0.0, **F64)), [5.0])


def test_gated_linear_attention_hand_cases():
    # d = 1, keys (1, 3), values (2, 4): S = mean(k v) = 7, z = mean(k) = 2 -> O = q S / (q z + eps)
    q, k, v = t([1.0], 1, 1, 1, 1), t([1.0, 3.0], 1, 1, 2, 1), t([2.0, 4.0], 1, 1, 2, 1)
    close(ops.gated_linear_attention(q, k, v), [3.5], tol=1e-5)
    close(ops.gated_linear_attention(q, k, v, key_gate=t([0.0, 1.0], 1, 1, 2, 1)), [4.0], tol=1e-5)  # key 1 gone
    close(ops.gated_linear_attention(q, k, v, value_gate=t([1.0, 0.5], 1, 1, 2, 1)), [2.0], tol=1e-5)
    # a negative query: phi(q) = 1e-6, so eps = 1e-6 weighs like the normaliser: 7e-6 / (2e-6 + 1e-6)
    close(ops.gated_linear_attention(-q, k, v), [7 / 3], tol=1e-5)
    assert ops.gated_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16


def test_neighborhood_attention_hand_cases():
    """Zero queries average their window: a 1 x 5 grid, kernel 3, windows shifted inwards at the
    borders (starts 0, 0, 1, 2, 2), the height-1 axis whole; values 0..4 -> (1, 1, 2, 3, 3)."""
    q = torch.zeros(1, 1, 5, 1, **F64)
    v = torch.arange(5, **F64).reshape(1, 1, 5, 1)
    close(ops.neighborhood_attention(q, q, v, (1, 5), 3, 1.0), [1, 1, 2, 3, 3])
    close(ops.neighborhood_attention(q, q, v, (5, 1), 3, 1.0), [1, 1, 2, 3, 3])    # the same down a column
    # the relative position bias: ln 2 at offset (0, +1), the key right of the query: over the values
    # (0, 4, 8) query 0 weighs them (1, 2, 1) / 4 -> 4, query 1 (1, 1, 2) / 4 -> 5, query 2 has no such key -> 4
    rpb = torch.zeros(1, 5, 5, **F64)
    rpb[0, 2, 3] = LN2
    v3 = t([0.0, 4.0, 8.0], 1, 1, 3, 1)
    z3 = torch.zeros(1, 1, 3, 1, **F64)
    close(ops.neighborhood_attention(z3, z3, v3, (1, 3), 3, 1.0, rpb), [4.0, 5.0, 4.0])


def test_neighborhood_attention_bf16_logits_in_fp32_and_rpb_shape_error():
    """bf16 q, k with logits of order 100, where bf16 spaces numbers 0.5 apart: the logits and softmax
    run in fp32, so only the weights' and the output's roundings to bf16 remain (within 2 % of the
    values' range); bf16 logits would move the weights by factors of e^0.25."""
    g = torch.Generator().manual_seed(0)
    q, k = (4 * torch.randn(1, 2, 30, 16, generator=g)).bfloat16(), (4 * torch.randn(1, 2, 30, 16, generator=g)).bfloat16()
    v = torch.randn(1, 2, 30, 16, generator=g).bfloat16()
    out = ops.neighborhood_attention(q, k, v, (5, 6), 3, 0.5)
    assert out.dtype == torch.bfloat16
    exact = ops.neighborhood_attention(q.double(), k.double(), v.double(), (5, 6), 3, 0.5)
    assert (out.double() - exact).abs().max() < 0.02 * v.double().abs().max()
    with pytest.raises(ValueError, match=r"rpb must be \(2, 5, 5\), got \(2, 3, 3\)"):
        ops.neighborhood_attention(q, k, v, (5, 6), 3, 0.5, torch.zeros(2, 3, 3))


def test_resolve_anchor():
    assert [ops.resolve_anchor(a, 4) for a in (0, 3, -1, -4)] == [0, 3, 3, 0]
    for bad in (4, -5):
        with pytest.raises(ValueError, match="outside a video of 4 frames"):
            ops.resolve_anchor(bad, 4)


def test_anchor_frame_attention_hand_cases():
    """Scale 0: every attention is a mean. Frame f's two tokens hold 10 f and 10 f + 2 (mean 10 f + 1);
    the anchor (frame 0) averages itself: 1."""
    frames = 3
    v = torch.tensor([[10.0 * f, 10.0 * f + 2] for f in range(frames)], **F64).reshape(frames, 1, 2, 1)
    q = k = torch.zeros(frames, 1, 2, 1, **F64)
    mean = [10.0 * f + 1 for f in range(frames)]
    for mode, weight, expected in [
        ("concat", 1.0, [mean[0]] + [(m + mean[0]) / 2 for m in mean[1:]]),
        ("concat", 0.5, [mean[0]] + [(m + 0.5 * mean[0]) / 1.5 for m in mean[1:]]),
        ("concat", 0.0, mean),
        ("replace", 1.0, [mean[0]] * frames),
        ("replace", 0.25, [mean[0]] + [0.75 * m + 0.25 * mean[0] for m in mean[1:]]),
    ]:
        out = ops.anchor_frame_attention(q, k, v, frames, 0, 0.0, mode, weight)
        close(out, [[e, e] for e in expected])
    close(ops.anchor_frame_attention(q, k, v, frames, 0, 0.0),                        # the defaults
          [[e, e] for e in [mean[0]] + [(m + mean[0]) / 2 for m in mean[1:]]])
    single = ops.anchor_frame_attention(q[1:2], k[1:2], v[1:2], 1, 0, 0.0)          # a 1-frame video
    assert single.shape == (1, 1, 2, 1)
    close(single, [mean[1], mean[1]])
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.anchor_frame_attention(q, k, v, frames, 0, 0.0, "mix")


# --- merge.py ---------------------------------------------------------------------------------------

# A 2 x 2 grid, one cell: destination 0 (top-left) holds e1; the sources' cosine similarities to it
# are 1 (token 1 = e1), 0 (token 2 = e2) and 1/sqrt 2 (token 3 = e1 + e2).
MATCH_METRIC = t([1, 0, 1, 0, 0, 1, 1, 1], 1, 4, 2)
MATCH_X = t([10, 20, 30, 40], 1, 4, 1)


def test_grid_merge_hand_case():
    match = merge.match_on_grid(MATCH_METRIC, (2, 2), 2, 0.5)            # r = int(0.5 * 4) = 2 sources merged
    assert match.dst_pos.tolist() == [0] and match.src_pos.tolist() == [1, 2, 3]
    assert match.assign.tolist() == [[0, 0, 0]] and match.num_merged == 2
    assert match.src_pos[match.order[0]].tolist() == [1, 3, 2]          # by decreasing similarity
    close(match.merge(MATCH_X), [30.0, 70.0 / 3])                        # token 2 kept; (10 + 20 + 40) / 3
    close(match.unmerge(match.merge(MATCH_X)), [70.0 / 3, 70.0 / 3, 30.0, 70.0 / 3])
    close(match.unmerge(t([-1.0, 5.0], 1, 2, 1)), [5.0, 5.0, -1.0, 5.0])
    # agents: a = min(int(ratio N), 3) most similar sources merged into the destination
    assert match.num_agents(1.0) == 1 and match.num_agents(0.25) == 3 and match.num_agents(0.0) == 4
    close(match.agents(MATCH_X, 1.0), [25.0])                            # every source: one agent per cell
    close(match.agents(MATCH_X, 0.25), [40.0, 30.0, 15.0])               # token 1 merged; 3, 2 stay
    close(match.agents(MATCH_X, 0.0), [20.0, 40.0, 30.0, 10.0])         # none merged: sources by rank, then 0
    assert merge.match_on_grid(MATCH_METRIC, (2, 2), 2, 0.9).num_merged == 3       # at most every source
    assert merge.match_on_grid(MATCH_METRIC, (2, 2), 2, 0.0).num_merged == 0


def test_matching_in_chunks_is_the_best_cosine_destination(monkeypatch):
    """One source row per chunk: each source's destination is its most cosine-similar one."""
    monkeypatch.setattr(merge, "_MATCH_CHUNK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 36, 3, generator=g, **F64)
    match = merge.match_on_grid(metric, (6, 6), 3, 0.5)
    for b in range(2):
        for row, s in enumerate(match.src_pos.tolist()):
            sims = [float(metric[b, s] @ metric[b, d] / (metric[b, s].norm() * metric[b, d].norm()))
                    for d in match.dst_pos.tolist()]
            assert match.assign[b, row].item() == max(range(len(sims)), key=sims.__getitem__)


def test_matching_skips_grids_narrower_than_a_cell_in_one_dimension():
    """No full cell as soon as one side is shorter than the stride (the other side long enough)."""
    for grid in [(2, 8), (8, 2), (3, 5)]:
        assert merge.match_on_grid(torch.randn(1, grid[0] * grid[1], 3, **F64), grid, 4, 0.5) is None
    assert merge.match_on_grid(torch.randn(1, 16, 3, **F64), (4, 4), 4, 0.5) is not None    # one full cell


def test_matching_in_fp32_for_bf16():
    """bf16 tokens are matched in fp32: on a 2 x 2 grid with destination 0 = (-1, -7), the sources'
    cosines are 74/sqrt(6500) = 0.9179 (token 1 = (3, -11)), -24/sqrt(5200) (token 2 = (10, 2)) and
    27/sqrt(850) = 0.9261 (token 3 = (1, -4)): 3 ranks first. Similarities rounded to bf16 (a step of
    2^-8 near 1, the unit vectors rounded too) rank token 1 first."""
    vectors = [(-1, -7), (3, -11), (10, 2), (1, -4)]
    cosine = [(a * -1 + b * -7) / math.sqrt((a * a + b * b) * 50) for a, b in vectors]
    assert [round(c, 4) for c in cosine[1:]] == [0.9179, -0.3328, 0.9261]
    metric = torch.tensor(vectors, dtype=torch.bfloat16)[None]
    match = merge.match_on_grid(metric, (2, 2), 2, 0.25)                 # r = 1: the most similar source
    assert match.src_pos[match.order[0]].tolist() == [3, 1, 2]
    close(match.merge(MATCH_X), [20.0, 30.0, 25.0])                      # (10 + 40) / 2


def test_destination_positions_on_the_requested_device():
    pos = merge.destination_positions((4, 6), 2, None, torch.device("meta"))
    assert pos.device.type == "meta" and pos.shape == (6,)


def test_norms_compute_in_fp32_for_bf16():
    """bf16 in: the statistics in fp32 and the result rounded to bf16 once, so within half a bf16
    ulp of the exact (float64) result on the same bf16 inputs."""
    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(2, 3, 256, 16, generator=g)).bfloat16()
    weight = (1 + torch.rand(16, generator=g)).bfloat16()
    exact = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight.double()
    assert_rounded_from_exact(ops.rms_norm(x, weight), exact)
    mean, var = x.double().mean(-2, keepdim=True), x.double().var(-2, unbiased=False, keepdim=True)
    assert_rounded_from_exact(ops.key_instance_norm(x), (x.double() - mean) / (var + 1.0).sqrt())
