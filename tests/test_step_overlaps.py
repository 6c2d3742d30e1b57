"""``cynag._step.mark_overlaps`` against a brute-force interval check.

The optimizer's step moves to ``REST`` every ``FAST`` row whose arrays
(parameter, gradient, state) overlap another row's arrays or an array of a
parameter updated by its rule.  The native check groups arrays by the
allocation that owns their memory (a hash table) and compares addresses
within a group only; here random rows of views into a few buffers, with
fresh arrays, arrays over memory NumPy does not own (owner unknown) and
strided extras, are compared with a check of every pair of intervals.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cynag import _multi_tensor  # noqa: F401 (configures cynag._step)
from cynag import _step

ITEM = 4  # float32


def _owner(a):
    """What the step takes for the allocation owning ``a``'s memory (0: unknown)."""
    while True:
        base = a.base
        if base is None:
            return id(a) if a.flags.owndata else 0
        if not isinstance(base, np.ndarray):
            return 0
        a = base


def _interval(a):
    lo = hi = a.__array_interface__["data"][0]
    for dim, stride in zip(a.shape, a.strides):
        if stride < 0:
            lo += stride * (dim - 1)
        else:
            hi += stride * (dim - 1)
    return lo, hi + a.itemsize


@st.composite
def layouts(draw):
    n_buffers = draw(st.integers(1, 3))
    foreign = draw(st.booleans())  # one buffer over a bytearray: owner unknown
    buffers = []
    for b in range(n_buffers):
        if foreign and b == 0:
            buffers.append(np.frombuffer(bytearray(64 * ITEM), np.float32))
        else:
            buffers.append(np.zeros(64, np.float32))

    def array(size):
        kind = draw(st.sampled_from(["fresh", "view", "view"]))
        if kind == "fresh" or size > 64:
            return np.zeros(size, np.float32)
        buf = buffers[draw(st.integers(0, n_buffers - 1))]
        off = draw(st.integers(0, 64 - size))
        return buf[off:off + size]

    rows = []
    for _ in range(draw(st.integers(1, 10))):
        size = draw(st.integers(0, 12))
        code = draw(st.sampled_from([_step.FAST, _step.FAST, _step.FAST, _step.REST]))
        rows.append((code, [array(size) for _ in range(3)]))
    extras = []
    for _ in range(draw(st.integers(0, 3))):
        buf = buffers[draw(st.integers(0, n_buffers - 1))]
        start = draw(st.integers(0, 63))
        step = draw(st.sampled_from([1, 2, 3, -1, -2]))
        extras.append(buf[start::step] if step > 0 else buf[start::step])
    return buffers, rows, extras


@settings(max_examples=400, deadline=None)
@given(layouts())
def test_mark_overlaps_matches_brute_force(layout):
    buffers, rows, extras = layout
    n = len(rows)
    table = _step.StepTable()
    table.reserve(n)
    table.release()
    for i, (code, arrays) in enumerate(rows):
        table.codes[i] = code
        table.flags[i] = 0
        table.sizes[i] = arrays[0].size
        table.type_nums[i] = np.dtype(np.float32).num
        for j, a in enumerate(arrays):
            table.ptrs[i, j] = a.__array_interface__["data"][0]
            table.owners[i, j] = _owner(a)
    # Records: every array of a FAST row of nonzero size, and every extra.
    records = [(i, _interval(a)) for i, (code, arrays) in enumerate(rows)
               if code == _step.FAST and arrays[0].size for a in arrays]
    records += [(-1, _interval(a)) for a in extras if a.size]
    expected = set()
    for k, (row, (lo, hi)) in enumerate(records):
        if row < 0:
            continue
        for k2, (_, (lo2, hi2)) in enumerate(records):
            if k2 != k and lo < hi2 and lo2 < hi:
                expected.add(row)
    moved = _step.mark_overlaps(table, list(extras))
    got = {i for i in range(n) if rows[i][0] == _step.FAST and table.codes[i] == _step.REST}
    assert got == expected
    assert moved == len(expected)
    assert not (table.flags[:n] & 2).any()  # the overlap bit is cleared
    # Again, on the same table: the scratch is left clean between calls.
    for i in expected:
        table.codes[i] = _step.FAST
    assert _step.mark_overlaps(table, list(extras)) == len(expected)


def test_table_references_are_held_until_release():
    """The table keeps each FAST row's rule and arrays alive until release();
    then every row is SKIP (its addresses may be stale) and out-of-range
    rows raise, even with ``n`` set beyond the table's room."""
    import sys

    import cynag

    link = cynag.Link()
    with link.init_scope():
        link.w = cynag.Parameter(np.ones(3, np.float32))
    opt = cynag.optimizers.NesterovAG().setup(link)
    link.w.grad = np.ones(3, np.float32)
    opt.update()  # (the state exists: the row is FAST)
    table = _step.StepTable()
    params = list(link.params())
    table.reserve(len(params))
    grad = link.w.grad
    before = sys.getrefcount(grad)
    assert _step.scan(params, table) == 1
    assert table.codes[0] == _step.FAST
    assert table.rule(0) is link.w.update_rule and table.kept(0, 1) is grad
    assert sys.getrefcount(grad) == before + 1
    table.release()
    assert sys.getrefcount(grad) == before
    assert table.codes[0] == _step.SKIP and table.rule(0) is None
    table.n = 1 << 40
    for bad in (lambda: table.rule(1 << 39), lambda: table.kept(1 << 39, 0),
                lambda: table.kept(0, 3)):
        try:
            bad()
        except IndexError:
            pass
        else:
            raise AssertionError("no IndexError")
