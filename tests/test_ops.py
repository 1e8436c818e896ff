"""The C++ ops: agreement with plain PyTorch, opcheck (fake kernels, autograd, schema), bad input."""

import sys

import pytest
import torch

from moe_resilient import _C, ops

S, E, H, I = 6, 4, 16, 24


@pytest.fixture(params=["avx512", "avx2"])
def tiles(request):
    """The streaming kernel's AVX-512 code (fp32 4x6 tiles; bf16 dot products where the CPU has
    AVX512_BF16) where the CPU has it, and its AVX2 code (switched to on such a CPU, the only code
    elsewhere)."""
    if request.param == "avx512" and not _C.skinny_avx512_enabled():
        pytest.skip("this CPU has no AVX-512: its tiles cannot run here")
    previous = _C.allow_skinny_avx512(request.param == "avx512")
    yield request.param
    _C.allow_skinny_avx512(previous)


def _placement():
    # expert e in slot e, expert 1 also in slot 4, expert 3 has no live replica, slot 5 spare
    log2phy = torch.tensor([[0, -1], [1, 4], [2, -1], [-1, -1]])
    logcnt = torch.tensor([1, 2, 1, 0])
    return log2phy, logcnt


def test_route_to_slots_matches_reference():
    log2phy, logcnt = _placement()
    ids = torch.randint(0, E, (37, 3))
    got = ops.route_to_slots(ids, log2phy, logcnt, S)
    want = ops.route_to_slots_reference(ids, log2phy, logcnt, S)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    slot_ids, order, offsets = got
    assert (slot_ids[ids == 3] == -1).all()  # no live replica -> unroutable
    assert set(slot_ids[ids == 1].tolist()) == {1, 4}  # both replicas used
    assert offsets[-1] == (ids != 3).sum()


def test_route_to_slots_counts_load_in_place_and_not_on_error():
    log2phy, logcnt = _placement()
    ids = torch.tensor([[0, 3], [1, 3], [1, 2]])  # expert 3 has no live replica: still counted
    for route in (ops.route_to_slots, ops.route_to_slots_reference):
        load = torch.full((E,), 5, dtype=torch.long)
        route(ids, log2phy, logcnt, S, load=load)
        assert load.tolist() == [6, 7, 6, 7]
    with pytest.raises(RuntimeError, match="out of range"):
        ops.route_to_slots(torch.tensor([[0, 1], [2, 9]]), log2phy, logcnt, S, load=load)
    assert load.tolist() == [6, 7, 6, 7]  # a rejected call counts nothing
    with pytest.raises(RuntimeError, match=r"load must be a contiguous int64 \[4\]"):
        ops.route_to_slots(ids, log2phy, logcnt, S, load=torch.zeros(E + 1, dtype=torch.long))
    torch.library.opcheck(torch.ops.moe_resilient.route_to_slots, (ids, log2phy, logcnt, S, False, load))


def test_route_to_slots_identity_is_fixed_placement():
    ids = torch.randint(0, E, (9, 2))
    slot_ids, _, offsets = ops.route_to_slots(ids, None, None, E)
    assert torch.equal(slot_ids, ids)
    assert torch.equal(offsets[1:] - offsets[:-1], torch.bincount(ids.flatten(), minlength=E))


def test_route_to_slots_rejects_unknown_expert():
    log2phy, logcnt = _placement()
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        ops.route_to_slots(torch.tensor([[9]]), log2phy, logcnt, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_matches_reference(dtype):
    counts = torch.tensor([3, 0, 40, 1, 0, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(int(offsets[-1]) + 2, H, dtype=dtype)  # two trailing unroutable rows
    w13 = torch.randn(S, 2 * I, H, dtype=dtype) / H**0.5
    w2 = torch.randn(S, H, I, dtype=dtype) / I**0.5
    got = ops.grouped_swiglu(x, offsets, w13, w2)
    want = ops.grouped_swiglu_reference(x, offsets, w13, w2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (got[-2:] == 0).all()


def test_grouped_swiglu_gradients_match_reference():
    offsets = torch.tensor([0, 2, 2, 9, 10, 10, 12])
    x = torch.randn(12, H, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(S, 2 * I, H, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(S, H, I, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: ops.grouped_swiglu(a[0], offsets, a[1], a[2]), (x, w13, w2))


def test_opcheck():
    log2phy, logcnt = _placement()
    torch.library.opcheck(torch.ops.moe_resilient.route_to_slots, (torch.randint(0, E, (5, 2)), log2phy, logcnt, S))
    torch.library.opcheck(torch.ops.moe_resilient.route_to_slots, (torch.randint(0, E, (5, 2)), None, None, E))
    offsets = torch.tensor([0, 2, 2, 5, 6, 6, 7])
    args = (
        torch.randn(7, H, requires_grad=True),
        offsets,
        torch.randn(S, 2 * I, H, requires_grad=True),
        torch.randn(S, H, I, requires_grad=True),
    )
    torch.library.opcheck(torch.ops.moe_resilient.grouped_swiglu, args)
    torch.library.opcheck(
        torch.ops.moe_resilient.grouped_swiglu_backward, (torch.randn(7, H), args[0].detach(), offsets, args[2].detach(), args[3].detach())
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (1, 2), (9, 2), (40, 3)])
def test_grouped_swiglu_combine_equals_its_parts(dtype, tokens, top_k):
    """The fused inference op against its steps (gather -> grouped_swiglu -> (token, k) order -> combine),
    with expert 3 unroutable (its pairs get weight 0, the rest rescaled)."""
    log2phy, logcnt = _placement()
    torch.manual_seed(tokens * 10 + top_k)
    x = torch.randn(tokens, H, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k)
    slot_ids, order, offsets = ops.route_to_slots(ids, log2phy, logcnt, S)
    w13, w2 = (torch.randn(S, 2 * I, H) / H**0.5).to(dtype), (torch.randn(S, H, I) / I**0.5).to(dtype)
    want = ops.gather_experts_combine(x, order, offsets, slot_ids, weights,
                                      lambda rows, offsets: ops.grouped_swiglu(rows, offsets, w13, w2))
    got = ops.grouped_swiglu_combine(x, order, offsets, slot_ids, weights, w13, w2)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_grouped_swiglu_combine_opcheck_and_bad_input():
    log2phy, logcnt = _placement()
    ids = torch.randint(0, E, (5, 2))
    slot_ids, order, offsets = ops.route_to_slots(ids, log2phy, logcnt, S)
    args = (torch.randn(5, H), order, offsets, slot_ids, torch.rand(5, 2), torch.randn(S, 2 * I, H), torch.randn(S, H, I))
    torch.library.opcheck(torch.ops.moe_resilient.grouped_swiglu_combine, args)
    with pytest.raises(RuntimeError, match="topk_weights must be float32"):
        ops.grouped_swiglu_combine(*args[:4], args[4].double(), *args[5:])
    with pytest.raises(RuntimeError, match=r"order must be int64 \[T\*K\]"):
        ops.grouped_swiglu_combine(args[0], order[:-1], *args[2:])
    for bad in (order + 100, torch.zeros_like(order)):  # out of range; not a permutation
        with pytest.raises(RuntimeError, match="not a permutation"):
            ops.grouped_swiglu_combine(args[0], bad, *args[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tokens", [37, 70])  # the streaming kernel's logits; BLAS's (over 64 tokens)
def test_route_tokens_matches_its_parts(dtype, k, normalize, tokens):
    """Against F.linear, softmax, top-k, renormalize and route_to_slots, one after another."""
    log2phy, logcnt = _placement()
    x, weight = torch.randn(tokens, 45).to(dtype), (torch.randn(E, 45) / 45**0.5).to(dtype)
    x[0] = 0  # all logits 0: tied, lower expert ids first
    load = torch.zeros(E, dtype=torch.long)
    logits, weights, ids, slot_ids, order, offsets = ops.route_tokens(x, weight, k, normalize, log2phy, logcnt, S,
                                                                      load=load)
    assert logits.dtype == dtype and weights.dtype == torch.float32
    torch.testing.assert_close(logits, torch.nn.functional.linear(x, weight),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # its own rounded logits, as the layer does
    want_values = scores.topk(k, dim=-1).values
    assert ids[0].tolist() == list(range(k))
    # bf16 logits tie often: the chosen scores must be the top-k, highest first (ids may swap on ties)
    assert torch.equal(scores.gather(1, ids), want_values)
    assert all(len(set(row)) == k for row in ids.tolist())
    want = want_values / (want_values.sum(-1, keepdim=True) + 1e-20) if normalize else want_values
    torch.testing.assert_close(weights, want, rtol=1e-6, atol=1e-7)
    want_load = torch.zeros(E, dtype=torch.long)
    for got, expected in zip((slot_ids, order, offsets), ops.route_to_slots(ids, log2phy, logcnt, S, load=want_load)):
        assert torch.equal(got, expected)
    assert torch.equal(load, want_load)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, scaling", [(1, 1.0), (9, 2.5), (70, 1.0)])
def test_moe_forward_equals_its_parts(dtype, tokens, scaling):
    """The whole-block op, through its direct door (eager, no grad) and through torch.ops, against
    route_tokens -> weights * scaling -> grouped_swiglu_combine; expert 3 is unroutable. Both doors give
    the same bits and count the load once per call."""
    log2phy, logcnt = _placement()
    torch.manual_seed(tokens)
    x, gate = torch.randn(tokens, H).to(dtype), (torch.randn(E, H) / H**0.5).to(dtype)
    w13, w2 = (torch.randn(S, 2 * I, H) / H**0.5).to(dtype), (torch.randn(S, H, I) / I**0.5).to(dtype)
    want_load = torch.zeros(E, dtype=torch.long)
    logits, weights, _, slot_ids, order, offsets = ops.route_tokens(x, gate, 2, True, log2phy, logcnt, S,
                                                                    load=want_load)
    want = ops.grouped_swiglu_combine(x, order, offsets, slot_ids, weights * scaling, w13, w2)
    args = (x, gate, 2, True, log2phy, logcnt, S, False, w13, w2, scaling)
    direct_load, dispatched_load = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
    direct = _C.moe_forward(*args, direct_load)
    dispatched = torch.ops.moe_resilient.moe_forward(*args, dispatched_load)
    with torch.no_grad():
        via_ops = ops.moe_forward(*args)
    for got in (direct, dispatched, via_ops):
        assert torch.equal(got[0], want) and torch.equal(got[1], logits)
    assert torch.equal(direct_load, want_load) and torch.equal(dispatched_load, want_load)
    reference = ops.moe_forward_reference(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(direct[0], reference[0], rtol=tol, atol=tol)


def test_moe_forward_opcheck_and_bad_input():
    """opcheck; and a rejected call, through either door, raises a typed error and leaves `load` as it was."""
    log2phy, logcnt = _placement()
    x, gate, load = torch.randn(5, H), torch.randn(E, H), torch.zeros(E, dtype=torch.long)
    w13, w2 = torch.randn(S, 2 * I, H), torch.randn(S, H, I)
    torch.library.opcheck(torch.ops.moe_resilient.moe_forward,
                          (x, gate, 2, True, log2phy, logcnt, S, False, w13, w2, 1.5, load))
    load.zero_()
    for door in (_C.moe_forward, torch.ops.moe_resilient.moe_forward):
        with pytest.raises(RuntimeError, match="disagree"):
            door(x, gate, 2, True, log2phy, logcnt, S, False, w13, w2[..., :-1], 1.0, load)
        with pytest.raises(RuntimeError, match="w13 holds 6 slots, num_slots is 5"):
            door(x, gate, 2, True, log2phy, logcnt, S - 1, False, w13, w2, 1.0, load)
        with pytest.raises(RuntimeError, match="no live replica"):  # expert 3 chosen, strict
            door(torch.randn(40, H), gate, E, True, log2phy, logcnt, S, True, w13, w2, 1.0, load)
        with pytest.raises(RuntimeError, match=r"k = 0 outside"):
            door(x, gate, 0, True, log2phy, logcnt, S, False, w13, w2, 1.0, load)
    assert not load.any()
    with pytest.raises(TypeError, match="k must be an int"):
        _C.moe_forward(x, gate, "2", True, log2phy, logcnt, S, False, w13, w2, 1.0, load)
    with pytest.raises(TypeError, match="w13 must be a tensor"):
        _C.moe_forward(x, gate, 2, True, log2phy, logcnt, S, False, None, w2, 1.0, load)
    with pytest.raises(TypeError, match="12 positional arguments, got 11"):
        _C.moe_forward(x, gate, 2, True, log2phy, logcnt, S, False, w13, w2, 1.0)
    with pytest.raises(ValueError, match="CPU tensors only"):
        _C.moe_forward(x, gate, 2, True, log2phy, logcnt, S, False, w13.to("meta"), w2, 1.0, load)
    assert not load.any()


def test_route_tokens_with_nan_logits_propagates_nan():
    """A NaN logit (a broken model) makes the weights NaN, as softmax does on the unfused path; the
    selection stays k distinct experts, the NaN one first."""
    x, weight = torch.randn(4, 16), torch.randn(E, 16)
    weight[2] = float("nan")
    _, weights, ids, *_ = ops.route_tokens(x, weight, 3, True, None, None, E)
    assert weights.isnan().all()
    assert ids[:, 0].tolist() == [2] * 4 and all(len(set(row)) == 3 for row in ids.tolist())


def test_route_tokens_opcheck_and_bad_input():
    log2phy, logcnt = _placement()
    weight, load = torch.randn(E, H), torch.zeros(E, dtype=torch.long)
    for x in (torch.randn(5, H), torch.randn(0, H)):
        torch.library.opcheck(torch.ops.moe_resilient.route_tokens, (x, weight, 2, True, log2phy, logcnt, S, False, load))
    torch.library.opcheck(torch.ops.moe_resilient.route_tokens, (torch.randn(5, H), weight, 2, False, None, None, E))
    for k in (0, E + 1):
        with pytest.raises(RuntimeError, match=r"k = -?\d+ outside \[1, 4\]"):
            ops.route_tokens(torch.randn(5, H), weight, k, True, log2phy, logcnt, S)
    with pytest.raises(RuntimeError, match=r"x must be \[T, H\] and weight \[E, H\]"):
        ops.route_tokens(torch.randn(5, H + 1), weight, 2, True, log2phy, logcnt, S)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.route_tokens(torch.randn(5, H), weight.bfloat16(), 2, True, log2phy, logcnt, S)


def test_grouped_swiglu_bad_input():
    w13, w2 = torch.randn(S, 2 * I, H), torch.randn(S, H, I)
    with pytest.raises(RuntimeError, match="hidden size"):
        ops.grouped_swiglu(torch.randn(3, H + 1), torch.zeros(S + 1, dtype=torch.long), w13, w2)
    with pytest.raises(RuntimeError, match="offsets must be int64"):
        ops.grouped_swiglu(torch.randn(3, H), torch.zeros(S, dtype=torch.long), w13, w2)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.grouped_swiglu(torch.randn(3, H), torch.tensor([0, 2, 1, 3, 3, 3, 3]), w13, w2)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 17, 128, 129, 193])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, i", [(13, 11), (45, 43)])
def test_grouped_swiglu_odd_sizes(rows, dtype, h, i, tiles):
    """Sizes that are not multiples of the SIMD width (45 = 32 + 8 + 5: every loop of the row kernel and
    its tails), on every kernel shape (1-3, 4-7 and 8+ rows, AVX2 and AVX-512 tiles) and on BLAS (129 for
    fp32 on AVX2 and bf16 without AVX512_BF16, 193 for bf16 with it)."""
    s = 3
    offsets = torch.tensor([0, rows, rows, 2 * rows])
    x = torch.randn(2 * rows, h, dtype=dtype)
    w13, w2 = (torch.randn(s, 2 * i, h) / h**0.5).to(dtype), (torch.randn(s, h, i) / i**0.5).to(dtype)
    want = ops.grouped_swiglu_reference(x.float(), offsets, w13.float(), w2.float())  # exact arithmetic
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ops.grouped_swiglu(x, offsets, w13, w2).float(), want, rtol=tol, atol=tol)


def test_bf16_activation_rounds_alike_with_and_without_avx512():
    """bf16 activations are rounded by vcvtneps2bf16 where the CPU has AVX512_BF16 and by AVX2 integer
    steps elsewhere (or with AVX-512 switched off): the same bits. On BLAS-sized slots (200 rows) the
    products do not depend on the switch, so the outputs must be equal, tails (43 = 5 * 8 + 3) included."""
    offsets = torch.tensor([0, 200, 200, 400])
    x = torch.randn(400, 45, dtype=torch.bfloat16)
    w13 = (torch.randn(3, 86, 45) / 45**0.5).bfloat16()
    w2 = (torch.randn(3, 45, 43) / 43**0.5).bfloat16()
    previous = _C.allow_skinny_avx512(True)
    try:
        with_avx512 = ops.grouped_swiglu(x, offsets, w13, w2)
        _C.allow_skinny_avx512(False)
        assert torch.equal(ops.grouped_swiglu(x, offsets, w13, w2), with_avx512)
    finally:
        _C.allow_skinny_avx512(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, i, sizes", [
    (24, 20, [5, 130, 3, 7, 0, 129, 1, 600]),  # 600: BLAS under every threshold
    # both threads share every slot's weight rows (>= 96 of them), one call runs row, tile and
    # run-ahead kernels in turn, each thread's prefetch following it from slot to slot
    (100, 100, [1, 2, 3, 9, 16, 0, 33, 2, 130]),
])
def test_grouped_swiglu_mixes_kernel_paths_in_one_call(dtype, h, i, sizes, tiles):
    """Small slots (streaming kernel, activations per run of adjacent small slots) around large ones
    (BLAS), an empty slot, and unroutable rows past the last offset (zeros)."""
    offsets = torch.tensor([0] + sizes).cumsum(0)
    x = torch.randn(int(offsets[-1]) + 2, h, dtype=dtype)
    w13 = (torch.randn(len(sizes), 2 * i, h) / h**0.5).to(dtype)
    w2 = (torch.randn(len(sizes), h, i) / i**0.5).to(dtype)
    want = ops.grouped_swiglu_reference(x.float(), offsets, w13.float(), w2.float())
    got = ops.grouped_swiglu(x, offsets, w13, w2).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(got[-2:], torch.zeros(2, h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_with_more_threads_than_cores(dtype, tiles):
    """Each thread takes its share of the weight rows in chunks and, once out, takes the other threads'
    unclaimed chunks from the back. Four threads on this machine's cores get descheduled mid-call, so
    chunks change hands; every call has new x, so a chunk computed by no one would leave the previous
    call's rows in the output, and one computed twice would still be right: the results must match the
    reference every time."""
    h, i, sizes = 256, 512, [1, 3, 9, 16, 40, 0, 2]  # w13: 1024 weight rows, w2: 256; parts of >= 48
    offsets = torch.tensor([0] + sizes).cumsum(0)
    w13 = (torch.randn(len(sizes), 2 * i, h) / h**0.5).to(dtype)
    w2 = (torch.randn(len(sizes), h, i) / i**0.5).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for _ in range(20):
            x = torch.randn(int(offsets[-1]), h, dtype=dtype)
            want = ops.grouped_swiglu_reference(x.float(), offsets, w13.float(), w2.float())
            torch.testing.assert_close(ops.grouped_swiglu(x, offsets, w13, w2).float(), want, rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(threads)


def test_grouped_swiglu_half_takes_the_aten_activation():
    """fp16 has no fused activation pass (swiglu_act.h): BLAS products and ATen's silu * up on each
    slot's rows."""
    offsets = torch.tensor([0, 4, 4, 10])
    x = torch.randn(10, 32).half()
    w13, w2 = (torch.randn(3, 40, 32) / 32**0.5).half(), (torch.randn(3, 32, 20) / 20**0.5).half()
    want = ops.grouped_swiglu_reference(x.float(), offsets, w13.float(), w2.float())
    torch.testing.assert_close(ops.grouped_swiglu(x, offsets, w13, w2).float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 700])  # the streaming kernel's activation pass; BLAS's
def test_grouped_swiglu_activation_at_extreme_gates(dtype, rows):
    """The fused activation's exp: gates far past its clamp (|g| up to 300) give silu(g) * up as in float64
    within a rounding, and a row with a NaN stays NaN. Weights [eye * 300; eye] make gate = 300 x, up = x,
    and w2 = eye returns the activation itself."""
    n = 16
    w13 = torch.cat([300 * torch.eye(n), torch.eye(n)]).unsqueeze(0).to(dtype)
    w2 = torch.eye(n).unsqueeze(0).to(dtype)
    x = torch.linspace(-1, 1, rows * n).reshape(rows, n).to(dtype)
    x[1, 5] = float("nan")
    offsets = torch.tensor([0, rows])
    got = ops.grouped_swiglu(x, offsets, w13, w2).double()
    want = ops.grouped_swiglu_reference(x.double(), offsets, w13.double(), w2.double())
    assert torch.isnan(got[1]).all() and torch.isnan(want[1]).all()  # 0 * nan: the whole row
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("route", [ops.route_to_slots, ops.route_to_slots_reference])
def test_route_to_slots_strict_raises_on_uncovered_expert(route):
    log2phy, logcnt = _placement()  # expert 3 has no live replica
    route(torch.tensor([[0, 1]]), log2phy, logcnt, S, True)  # all covered: fine
    with pytest.raises(RuntimeError, match="expert 3 has no live replica"):
        route(torch.tensor([[0, 3]]), log2phy, logcnt, S, True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py adds -fopenmp on Linux only")
def test_kernels_built_with_openmp():
    """Without -fopenmp, at::parallel_for in our kernels silently runs on one core."""
    from moe_resilient import _C

    assert _C.built_with_openmp()


# The plain PyTorch implementations are the ops' kernels on CUDA (tests/test_cuda.py runs them there):
# here, on CPU, they must agree with the C++ kernels, errors included.
def _routed(tokens=11, k=2):
    log2phy, logcnt = _placement()
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(tokens)])
    return ids, log2phy, logcnt


def test_reference_kernels_equal_cpp_kernels():
    ids, log2phy, logcnt = _routed()
    x = torch.randn(ids.shape[0], H, dtype=torch.float64)
    w13, w2 = torch.randn(S, 2 * I, H, dtype=torch.float64), torch.randn(S, H, I, dtype=torch.float64)
    slot_ids, order, offsets = ops.route_to_slots(ids, log2phy, logcnt, S)
    weights = torch.rand(ids.shape)
    pairs = [
        (ops.route_to_slots, ops.route_to_slots_reference, (ids, log2phy, logcnt, S)),
        (ops.route_to_slots, ops.route_to_slots_reference, (ids, None, None, E)),
        (ops.route_tokens, ops.route_tokens_reference, (x, torch.randn(E, H, dtype=torch.float64), 2, True,
                                                        log2phy, logcnt, S)),
        (ops.grouped_swiglu_combine, ops.grouped_swiglu_combine_reference,
         (x, order, offsets, slot_ids, weights, w13, w2)),
        (torch.ops.moe_resilient.grouped_swiglu_backward, ops.grouped_swiglu_backward_reference,
         (torch.randn(ids.numel(), H, dtype=torch.float64), x.repeat(2, 1), offsets, w13, w2)),
    ]
    for cpp, ref, args in pairs:
        for got, want in zip(cpp(*args), ref(*args)):  # routing weights are float32 in both
            tol = {torch.float64: 1e-9, torch.float32: 1e-6}.get(got.dtype, 0)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_kernels_reject_bad_input_alike(impl):
    """Each bad input raises the same RuntimeError from both kernels, and a rejected call counts no load."""
    ids, log2phy, logcnt = _routed(5)
    route = ops.route_to_slots if impl == "cpp" else ops.route_to_slots_reference
    tokens = ops.route_tokens if impl == "cpp" else ops.route_tokens_reference
    swiglu = ops.grouped_swiglu if impl == "cpp" else ops.grouped_swiglu_reference
    fused = ops.grouped_swiglu_combine if impl == "cpp" else ops.grouped_swiglu_combine_reference
    load = torch.zeros(E, dtype=torch.long)
    broken_l2p = log2phy.clone()
    broken_l2p[1, 1] = S + 3
    cases = [
        (lambda: route(ids[0], log2phy, logcnt, S), r"topk_ids must be \[T, K\]"),
        (lambda: route(ids, log2phy, None, S), "pass both log2phy and logcnt or neither"),
        (lambda: route(torch.tensor([[0, 9]]), log2phy, logcnt, S, load=load), "expert id 9 out of range"),
        (lambda: route(torch.tensor([[1], [1]]), broken_l2p, logcnt, S, load=load), r"log2phy\[1\] names slot 9"),
        (lambda: route(torch.tensor([[3]]), log2phy, logcnt, S, True, load), "expert 3 has no live replica"),
        (lambda: route(ids, log2phy, logcnt, S, load=torch.zeros(E + 1, dtype=torch.long)), "load must be"),
        (lambda: tokens(torch.randn(5, H), torch.randn(E, H), E + 1, True, log2phy, logcnt, S), r"k = 5 outside"),
        (lambda: tokens(torch.randn(5, H), torch.randn(E, H + 1), 2, True, log2phy, logcnt, S), "x must be"),
        (lambda: swiglu(torch.randn(3, H + 1), torch.zeros(S + 1, dtype=torch.long), torch.randn(S, 2 * I, H),
                        torch.randn(S, H, I)), "hidden size"),
        (lambda: swiglu(torch.randn(3, H), torch.tensor([0, 2, 1, 3, 3, 3, 3]), torch.randn(S, 2 * I, H),
                        torch.randn(S, H, I)), "non-decreasing"),
        (lambda: fused(torch.randn(5, H), torch.zeros(10, dtype=torch.long), torch.zeros(S + 1, dtype=torch.long),
                       ids, torch.rand(5, 2), torch.randn(S, 2 * I, H), torch.randn(S, H, I)), "not a permutation"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert load.tolist() == [0] * E
