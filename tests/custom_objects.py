"""Rules and layers that deeptaylor does not know (shared by the refusal tests of both backends)."""

from __future__ import annotations

import deeptaylor as dt


class _MyZPlus(dt.rules.ZPlus):
    """A subclass the engine cannot know: it passes isinstance(ZPlus) but is not ZPlus."""

    __slots__ = ()


class _MyRule(dt.rules.Rule):
    __slots__ = ()


class _MyLayer(dt.Layer):
    __slots__ = ()

    def output_shape(self, input_shape):
        return tuple(input_shape)
