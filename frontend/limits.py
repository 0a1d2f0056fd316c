"""Bounds on what dsv3c accepts, in one place: sizes that keep every count within int64 and every compile finite.

Input from a user (spec text, hand-edited IR, options) may be hostile or simply mistyped; these limits turn what
would otherwise be an overflow, an abort inside XLA or an endless compile into an error that names the value.
They are far above any real DeepSeek-V3-family model (the 671B model's largest tensor has 2^37.7 elements)."""

from __future__ import annotations

MAX_SPEC_BYTES = 1 << 20
"""A `.dsv3` spec is a page of text; a larger file is a mistake (a binary, a dataset) and would only be slow."""

MAX_IR_BYTES = 32 << 20
"""A dsv3 IR file stays small because layers are stacked (`dsv3.layer_stack`): the 671B model dumps to ~100 KB."""

MAX_NESTING = 16
"""Deepest `{ ... }` nesting a spec may have (the language needs four); bounds recursion in the front end."""

MAX_INT = (1 << 31) - 1
"""Largest integer a spec field may hold: sizes, counts and steps. Token ids are int32, so a vocabulary cannot be
larger, and no other dimension of a real model comes near it."""

MAX_TENSOR_ELEMENTS = 1 << 48
"""Largest parameter tensor: its size in bytes (at most 8 per element, optimizer moments included) stays far
inside int64, which XLA and NumPy index with."""

MAX_TOTAL_PARAMS = 1 << 50
"""Largest total parameter count of a model, for the same reason as MAX_TENSOR_ELEMENTS."""

MAX_MTP_DEPTH = 16
"""Multi-token prediction modules are compiled one by one, so the depth bounds the compile time (V3 uses 1)."""

MAX_NUMBER_CHARS = 64
"""Longest number a spec may spell; longer ones are refused before conversion (Python limits int() to 4300 digits
and a float this long carries no more meaning)."""
