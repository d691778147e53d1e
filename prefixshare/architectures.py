"""The error ``patch`` raises for a model it cannot make exact.

There is no list of supported architectures: ``prefixshare.patch`` decides from what the model is made of
(:mod:`prefixshare.structure`: its token mixers, its attention modules and their features, its layer types),
from what each attention call asks for, and from the self-check on the model itself
(:mod:`prefixshare.selfcheck`). ``compat/MATRIX.md`` lists every decoder-only causal LM of the installed
transformers with the result.
"""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model has a layer or an attention feature a prefix-shared batch cannot be made exact for.

    The message names the layer (or attention module) and the feature: a convolution or a recurrence over the
    sequence, attention outside transformers' ``AttentionInterface``, a kind of attention layer the kernels do
    not apply, a mask or bias the model builds itself, or a self-check that found different numbers.
    """
