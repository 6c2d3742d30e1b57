"""Change counters that let the multi-tensor plan skip work when nothing changed.

Every change that can alter how parameters are grouped for the multi-tensor
update bumps :data:`structure`: a parameter's array or update rule replaced,
a link's parameters or children added or removed, a rule enabled or
disabled, a hook added or removed, a state array replaced, a hyperparameter
attribute added or removed.  A gradient array replaced or cleared bumps
:data:`grads`; a hyperparameter value or a loss scale changed bumps
:data:`hyper`.  The optimizer compares the counters with the values it saw
when it built its plan: equal counters mean the plan still holds, so a step
costs no Python work per parameter.

Objects cynag does not own (a ``chainer.Link`` and its parameters) do not
report their changes; plans that contain them are checked at every step.
"""


class Counter:
    """A mutable integer (``n``), shared by reference."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1


structure = Counter()
grads = Counter()
hyper = Counter()


def snapshot():
    """The three counters as a tuple."""
    return structure.n, grads.n, hyper.n
