"""dropout.py, the counter-based masks, and the CPU kernels of dropout_copies / dropout_sum: the hash against plain
modular arithmetic, the kernels against the spec bit for bit, the masks' statistics (keep rate, neighbours, copies,
seeds), edges and argument errors, and the ops' schemas and fake kernels (opcheck).

Covers CPU. The CUDA kernels against these: tests/cuda/test_dropout_cuda.py.
"""

import random

import pytest
import torch

from minqlora import dropout
from minqlora.dropout import dropout_copies_ref, dropout_sum_ref, keep_mask

ops = torch.ops.minqlora


def lowbias32(v: int) -> int:
    """Wellons' lowbias32 written with Python's unbounded ints, reduced mod 2³² after each multiply."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) % 2**32
    v ^= v >> 15
    v = (v * 0x846CA68B) % 2**32
    return v ^ (v >> 16)


def test_mix32_is_lowbias32_on_ints_and_tensors():
    rng = random.Random(0)
    vs = [0, 1, 2**32 - 1, 2**31] + [rng.randrange(2**32) for _ in range(200)]
    want = [lowbias32(v) for v in vs]
    assert [dropout.mix32(v) for v in vs] == want
    assert dropout.mix32(torch.tensor(vs, dtype=torch.int64)).tolist() == want


def test_hash_bits_of_an_index():
    seed = (7 << 40) + 99
    k1, k2 = lowbias32(seed % 2**32), lowbias32((seed >> 32) ^ 0x9E3779B9)
    for i in (0, 5, 2**32 + 3):
        want = lowbias32((lowbias32((i % 2**32) ^ k1) + ((i >> 32) ^ k2)) % 2**32)
        assert dropout.hash_bits(seed, i, 1).item() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copies, ps", [(1, [0.05]), (3, [0.3]), (2, [0.0, 0.7])])
def test_cpu_kernels_equal_the_spec(dtype, copies, ps):
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(1)).to(dtype)  # odd sizes
    got = ops.dropout_copies(x, 2024, ps, copies)
    assert got.dtype == dtype and got.shape == (copies, 5, 37)
    assert torch.equal(got, dropout_copies_ref(x, 2024, ps, copies))
    g = torch.randn(copies, 5, 37, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(ops.dropout_sum(g, 2024, ps), dropout_sum_ref(g, 2024, ps), rtol=0, atol=0)
    # A non-contiguous input is taken as its values
    xt = x.t()
    assert torch.equal(ops.dropout_copies(xt, 5, ps, copies), dropout_copies_ref(xt.contiguous(), 5, ps, copies))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_mask_statistics(p):
    """Keep rate 1 - p within 6 standard deviations, in every copy; no correlation between neighbours, between copies
    or between seeds."""
    n = 1 << 20
    m = keep_mask(3, (2, n), [p]).float()
    sd = (p * (1 - p) / n) ** 0.5
    for row in m:
        assert abs(row.mean().item() - (1 - p)) < 6 * sd

    def corr(a, b):
        return (((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())).item()

    bound = 6 / n**0.5
    assert abs(corr(m[0, :-1], m[0, 1:])) < bound
    assert abs(corr(m[0], m[1])) < bound
    assert abs(corr(m[0], keep_mask(4, (1, n), [p])[0].float())) < bound


def test_mask_edges():
    assert keep_mask(0, (1, 3, 5), [0.0]).all()
    assert keep_mask(0, (1, 7), [1e-12]).all()  # rounds to 0 at 2⁻³²
    assert dropout.threshold(0.5) == 2**31
    m = keep_mask(1, (2, 1 << 18), [0.0, 0.9])
    assert m[0].all() and abs(m[1].float().mean().item() - 0.1) < 0.005
    assert torch.equal(keep_mask(9, (1, 100), [0.5]), keep_mask(9, (1, 100), [0.5]))  # the seed decides
    assert not torch.equal(keep_mask(9, (1, 100), [0.5]), keep_mask(10, (1, 100), [0.5]))
    x = torch.empty(0, 4)
    assert ops.dropout_copies(x, 1, [0.1], 2).shape == (2, 0, 4)
    assert ops.dropout_sum(torch.empty(2, 0, 4), 1, [0.1]).shape == (0, 4)


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = dropout.draw_seed()
    torch.manual_seed(5)
    assert dropout.draw_seed() == a and 0 <= a < 2**63


def test_argument_errors():
    x = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="dropout probability must be in \\[0, 1\\)"):
        ops.dropout_copies(x, 1, [1.0], 1)
    with pytest.raises(RuntimeError, match="seed must be in"):
        ops.dropout_copies(x, -1, [0.1], 1)
    with pytest.raises(RuntimeError, match="copies must be in \\[1, 8\\]"):
        ops.dropout_copies(x, 1, [0.1], 9)
    with pytest.raises(RuntimeError, match="2 probabilities for 3 copies"):
        ops.dropout_copies(x, 1, [0.1, 0.2], 3)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.dropout_copies(x.long(), 1, [0.1], 1)
    with pytest.raises(RuntimeError, match="g must be \\(copies, ...\\)"):
        ops.dropout_sum(torch.tensor(1.0), 1, [0.1])
    with pytest.raises(ValueError, match="dropout probability must be in"):
        dropout.threshold(-0.1)
    with pytest.raises(ValueError, match="dropout seed must be in"):
        dropout.keys(2**63)
    with pytest.raises(ValueError, match="1 probabilities for|2 probabilities for 3 copies"):
        keep_mask(1, (3, 4), [0.1, 0.2])


def test_opcheck():
    x = torch.randn(3, 8)
    torch.library.opcheck(ops.dropout_copies, (x, 3, [0.2], 2))
    torch.library.opcheck(ops.dropout_sum, (torch.randn(2, 3, 8), 3, [0.2]))
