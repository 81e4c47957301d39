"""Special token ids for the Birdie objectives, reserved above a base (e.g. byte-level) vocabulary.

Layout, for a base vocabulary of ``base`` ids (ByteTokenizer: 0..255 bytes, 256..259 its own specials) and
``P = num_placeholders``::

    [0, base)                          the base tokenizer's ids (text tokens; never produced by the objectives)
    base + 0                           [START]          separates the input from the label region when packed
    base + 1                           [DONE]           ends a selective-copying answer
    base + 2, base + 3                 [CONTEXT], [/CONTEXT]   wrap the context of selective copying
    base + 4, base + 5                 [QUERY], [SEP]   a selective-copying query: [QUERY] <i> before [SEP] after
    base + 6 .. base + 6 + F - 1       one paradigm token per objective family (F = len(PARADIGMS)), in the order
                                       of :data:`PARADIGMS`, e.g. ``<|INFILL|>``
    base + 6 + F .. + P - 1            numbered placeholders (sentinels) <0>, <1>, ..., <P-1>
    vocab_size = base + 6 + F + P      the embedding size a model needs

Placeholders number masked spans (infilling, autoencoding) and selective-copying queries, in order of
appearance.
"""

from __future__ import annotations

#: Objective family -> paradigm string. Each family gets its own token id (see the layout above).
PARADIGMS: dict[str, str] = {
    "next_token": "<|NEXT_TOKEN|>",
    "prefix_lm": "<|PREFIX_LM|>",
    "infilling": "<|INFILL|>",
    "copying": "<|COPY|>",
    "selective_copying": "<|SELECTIVE_COPY|>",
    "deshuffling": "<|DESHUFFLE|>",
    "autoencoding": "<|AUTOENCODE|>",
    "autoencoding_deshuffle": "<|AUTOENCODE_DESHUFFLE|>",
}

_MARKERS = ("[START]", "[DONE]", "[CONTEXT]", "[/CONTEXT]", "[QUERY]", "[SEP]")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ObjectiveVocab: {name} must be an int >= {minimum}, got {value!r}")
    return value


class ObjectiveVocab:
    """The token ids the objectives use, reserved above ``base_vocab_size`` (see the module docstring).

    Args:
        base_vocab_size: size of the text tokenizer's vocabulary (ByteTokenizer: 260). Text ids must lie below.
        num_placeholders: how many numbered sentinels to reserve; an objective never numbers more spans or
            queries than this (span masking stops when they run out).

    Attributes: ``start_id``, ``done_id``, ``context_open_id``, ``context_close_id``, ``query_id``, ``sep_id``,
    ``placeholder_base``, ``vocab_size``. Padding is not reserved here: the packer pads rows with the base
    tokenizer's pad id (ByteTokenizer: 256), never scored.
    """

    def __init__(self, base_vocab_size: int = 260, num_placeholders: int = 512) -> None:
        self.base_vocab_size = _positive_int("base_vocab_size", base_vocab_size)
        self.num_placeholders = _positive_int("num_placeholders", num_placeholders)
        b = self.base_vocab_size
        (self.start_id, self.done_id, self.context_open_id, self.context_close_id, self.query_id,
         self.sep_id) = range(b, b + len(_MARKERS))
        self._paradigm_base = b + len(_MARKERS)
        self._paradigm_ids = {fam: self._paradigm_base + i for i, fam in enumerate(PARADIGMS)}
        self.placeholder_base = self._paradigm_base + len(PARADIGMS)
        self.vocab_size = self.placeholder_base + self.num_placeholders

    def paradigm_id(self, family: str) -> int:
        """The paradigm token of an objective family (a key of :data:`PARADIGMS`)."""
        if family not in self._paradigm_ids:
            raise ValueError(f"unknown objective family {family!r}; expected one of {', '.join(PARADIGMS)}")
        return self._paradigm_ids[family]

    def placeholder(self, i: int) -> int:
        """The id of numbered placeholder ``<i>``, 0 <= i < num_placeholders."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_placeholders:
            raise ValueError(f"placeholder index must be an int in [0, {self.num_placeholders}), got {i!r}")
        return self.placeholder_base + i

    def is_placeholder(self, token: int) -> bool:
        return self.placeholder_base <= int(token) < self.vocab_size

    def token_name(self, token: int) -> str:
        """A readable name for a special id (``'[START]'``, ``'<|INFILL|>'``, ``'<3>'``) or ``str(id)``."""
        t = int(token)
        if self.start_id <= t < self._paradigm_base:
            return _MARKERS[t - self.start_id]
        if self._paradigm_base <= t < self.placeholder_base:
            return list(PARADIGMS.values())[t - self._paradigm_base]
        if self.placeholder_base <= t < self.vocab_size:
            return f"<{t - self.placeholder_base}>"
        return str(t)

    def layout(self) -> dict[str, tuple[int, int]]:
        """Name -> [first, last] id range of each region, for documentation and checks."""
        out = {"text": (0, self.base_vocab_size - 1)}
        out.update({m: (i, i) for i, m in zip(range(self.start_id, self._paradigm_base), _MARKERS, strict=True)})
        out.update({p: (self._paradigm_ids[f],) * 2 for f, p in PARADIGMS.items()})
        out["placeholders"] = (self.placeholder_base, self.vocab_size - 1)
        return out

    def to_dict(self) -> dict[str, int]:
        return {"base_vocab_size": self.base_vocab_size, "num_placeholders": self.num_placeholders}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectiveVocab) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.base_vocab_size, self.num_placeholders))

    def __repr__(self) -> str:
        return (f"ObjectiveVocab(base_vocab_size={self.base_vocab_size}, "
                f"num_placeholders={self.num_placeholders}, vocab_size={self.vocab_size})")
