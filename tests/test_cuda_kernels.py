"""The ops' CUDA kernels (ops/cuda.py), run here on CPU, where torch._grouped_mm has a kernel too: equal
to the references, errors included, and a rejected call counts no load. tests/test_cuda.py runs them on a
GPU, captured in a CUDA graph too."""

import pytest
import torch

from moe_resilient.ops import cuda as ck
from moe_resilient import ops

S, E, H, I = 6, 4, 16, 24

try:
    torch._grouped_mm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(1, 8, 8, dtype=torch.bfloat16),
                      offs=torch.tensor([2], dtype=torch.int32))
except (AttributeError, RuntimeError, NotImplementedError):
    pytest.skip("this torch has no CPU torch._grouped_mm", allow_module_level=True)


def _placement():
    # expert e in slot e, expert 1 also in slot 4, expert 3 has no live replica, slot 5 spare
    return torch.tensor([[0, -1], [1, 4], [2, -1], [-1, -1]]), torch.tensor([1, 2, 1, 0])


def _case(dtype, tokens=11, k=2):
    torch.manual_seed(tokens)
    log2phy, logcnt = _placement()
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
    x = torch.randn(tokens, H, dtype=dtype)
    w13, w2 = torch.randn(S, 2 * I, H, dtype=dtype) / 4, torch.randn(S, H, I, dtype=dtype) / 4
    return ids, log2phy, logcnt, x, w13, w2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compositions_equal_references(dtype):
    ids, log2phy, logcnt, x, w13, w2 = _case(dtype)
    for table in [(None, None), (log2phy, logcnt)]:  # the placement last: its routing is used below
        n = S if table[0] is not None else E
        load, want_load = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
        got = ck.route_to_slots(ids, *table, n, load=load)
        want = ops.route_to_slots_reference(ids, *table, n, load=want_load)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert torch.equal(load, want_load)
    slot_ids, order, offsets = want
    assert (slot_ids == -1).any()  # expert 3's pairs are unroutable
    weights = torch.rand(ids.shape)
    rows = x[order // 2]
    grad = torch.randn_like(rows)
    torch.testing.assert_close(ck.swiglu_rows(rows, offsets, w13, w2), ops.grouped_swiglu_reference(rows, offsets, w13, w2))
    for g, w in zip(ck.swiglu_rows_backward(grad, rows, offsets, w13, w2),
                    ops.grouped_swiglu_backward_reference(grad, rows, offsets, w13, w2)):
        torch.testing.assert_close(g, w)
    ends = ck.slot_ends(offsets, order.shape[0])
    torch.testing.assert_close(ck.combine_rows(x, order, ends, slot_ids, weights, w13, w2),
                               ops.grouped_swiglu_combine_reference(x, order, offsets, slot_ids, weights, w13, w2))
    gate = torch.randn(E, H, dtype=dtype)
    for normalize in (True, False):
        args = (x, gate, 2, normalize, log2phy, logcnt, S)
        for g, w in zip(ck.route_tokens(*args), ops.route_tokens_reference(*args)):
            torch.testing.assert_close(g, w)
    if dtype == torch.bfloat16:  # the one dtype moe_forward composes (grouped_mm_fits); others: the reference
        args = (x.view(1, 11, H), gate, 2, True, log2phy, logcnt, S, False, w13, w2, 1.5)
        for g, w in zip(ck.moe_forward(*args), ops.moe_forward_reference(*args)):
            torch.testing.assert_close(g, w)


def test_only_bf16_with_aligned_sizes_takes_grouped_mm():
    _, _, _, x, w13, w2 = _case(torch.bfloat16)
    assert ck.grouped_mm_fits(x, w13, w2)
    assert not ck.grouped_mm_fits(x.float(), w13.float(), w2.float())
    assert not ck.grouped_mm_fits(x[:0], w13, w2)
    assert not ck.grouped_mm_fits(x[:, :12], w13[:, :, :12], w2[:, :12])  # H = 12: rows of 24 bytes


def test_bad_values_raise_the_references_errors():
    """Checked by one flag per call; a set flag reruns the reference, which raises; no load is counted."""
    ids, log2phy, logcnt, x, w13, w2 = _case(torch.bfloat16, tokens=5)
    load = torch.zeros(E, dtype=torch.long)
    broken = log2phy.clone()
    broken[1, 1] = S + 3
    slot_ids, order, offsets = ck.route_to_slots(ids, log2phy, logcnt, S)
    gate = torch.randn(E, H, dtype=torch.bfloat16)
    cases = [
        (lambda: ck.route_to_slots(torch.tensor([[0, 9]]), log2phy, logcnt, S, load=load), "expert id 9 out of range"),
        (lambda: ck.route_to_slots(torch.tensor([[1], [1]]), broken, logcnt, S, load=load), r"log2phy\[1\] names slot 9"),
        (lambda: ck.route_to_slots(torch.tensor([[3]]), log2phy, logcnt, S, True, load), "expert 3 has no live replica"),
        (lambda: ck.route_to_slots(ids, log2phy, logcnt, S, load=torch.zeros(E + 1, dtype=torch.long)), "load must"),
        (lambda: ck.grouped_swiglu(x[:3], torch.tensor([0, 2, 1, 3, 3, 3, 3]), w13, w2), "non-decreasing"),
        (lambda: ck.grouped_swiglu_combine(x, torch.zeros(10, dtype=torch.long), offsets, slot_ids,
                                           torch.rand(5, 2), w13, w2), "not a permutation"),
        (lambda: ck.moe_forward(x, gate, 2, True, log2phy, torch.tensor([1, 2, 1, 0]), S, True, w13, w2, 1.0, load),
         "has no live replica"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert load.tolist() == [0] * E


def test_moe_forward_trusts_tables_without_faulting():
    """Serving reads nothing back, so it cannot raise for a replica table that names slots out of range,
    nor for counts past the table: those tokens' outputs are undefined, but no read goes out of bounds
    (on CPU an out-of-bounds index raises)."""
    _, log2phy, logcnt, x, w13, w2 = _case(torch.bfloat16)
    broken = torch.full_like(log2phy, S + 3)
    broken[3, 0] = -7
    out, _ = ck.moe_forward(x, torch.randn(E, H, dtype=torch.bfloat16), 2, True, broken, logcnt + 5, S, False,
                            w13, w2)
    assert out.shape == x.shape
