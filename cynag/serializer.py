"""The serialization protocol, as in ``chainer.serializer``.

An object that can be saved and loaded has a ``serialize(serializer)`` method
that calls ``serializer(key, value)`` for each of its values and
``child.serialize(serializer[name])`` for each child.  The same method serves
both directions:

* a :class:`Serializer` stores ``value`` under ``key`` and returns it;
* a :class:`Deserializer` returns the stored value: arrays are copied into
  ``value`` in place, scalars are returned converted to ``value``'s type, and
  with ``value=None`` the stored array itself is returned.
"""


class AbstractSerializer:
    """Base class of serializers and deserializers."""

    def __getitem__(self, key):
        """Child serializer for the name ``key``."""
        raise NotImplementedError

    def __call__(self, key, value):
        """Save or load ``value`` under ``key`` (see the module docstring)."""
        raise NotImplementedError


class Serializer(AbstractSerializer):
    """Base class of serializers."""

    def save(self, obj):
        """Save ``obj`` (``obj.serialize(self)``)."""
        obj.serialize(self)


class Deserializer(AbstractSerializer):
    """Base class of deserializers."""

    def load(self, obj):
        """Load ``obj`` (``obj.serialize(self)``)."""
        obj.serialize(self)
