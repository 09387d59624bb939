"""The adapter as one flat float32 vector: where every trainable tensor lives in it.

The exported program, the device optimizers and the coordinator all see the adapter as a
vector in R^d. The layout is the one map between that vector and the named peft tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdapterTensor:
    """One trainable tensor: its peft parameter name, shape and offset in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class AdapterLayout:
    tensors: tuple[AdapterTensor, ...]

    @property
    def dim(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @classmethod
    def from_shapes(cls, named_shapes: list[tuple[str, tuple[int, ...]]]) -> "AdapterLayout":
        tensors, offset = [], 0
        for name, shape in named_shapes:
            t = AdapterTensor(name, tuple(int(s) for s in shape), offset)
            tensors.append(t)
            offset = t.end
        return cls(tuple(tensors))

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tensors}

    def __getitem__(self, name: str) -> AdapterTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def span(self, part: str) -> tuple[int, int]:
        """The [start, stop) block of the tensors whose names contain `part` (e.g. "classifier"), which
        must sit side by side in the vector; ValueError otherwise."""
        chosen = [i for i, t in enumerate(self.tensors) if part in t.name]
        if not chosen:
            raise ValueError(f"no adapter tensor's name contains {part!r} (the first: "
                             f"{', '.join(t.name for t in self.tensors[:3])})")
        if chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise ValueError(f"the adapter tensors whose names contain {part!r} are not side by side in the vector")
        return self.tensors[chosen[0]].offset, self.tensors[chosen[-1]].end

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Views of `vector` shaped as each named tensor."""
        if vector.shape != (self.dim,):
            raise ValueError(f"adapter vector has shape {vector.shape}, layout expects ({self.dim},)")
        return {t.name: vector[t.offset : t.end].reshape(t.shape) for t in self.tensors}

    def flatten(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        missing = [t.name for t in self.tensors if t.name not in tensors]
        if missing:
            raise ValueError(f"missing adapter tensors: {missing[:3]}")
        out = np.empty(self.dim, dtype=np.float32)
        for t in self.tensors:
            value = np.asarray(tensors[t.name], dtype=np.float32)
            if value.shape != t.shape:
                raise ValueError(f"{t.name}: shape {value.shape}, layout expects {t.shape}")
            out[t.offset : t.end] = value.reshape(-1)
        return out

    def blocks(self, count: int) -> list[tuple[int, int]]:
        """Split the vector into `count` contiguous [start, stop) blocks of whole tensors, in layout
        order (so, roughly, by layer), each closing once it holds its share of the elements."""
        if not 1 <= count <= len(self.tensors):
            raise ValueError(f"cannot split {len(self.tensors)} adapter tensors into {count} blocks")
        bounds, start = [], 0
        for i, t in enumerate(self.tensors):
            left_tensors, left_blocks = len(self.tensors) - i - 1, count - len(bounds) - 1
            if left_blocks > 0 and (t.end >= self.dim * (len(bounds) + 1) / count or left_tensors == left_blocks):
                bounds.append((start, t.end))
                start = t.end
        bounds.append((start, self.dim))
        return bounds

    def to_json(self) -> list[dict]:
        return [{"name": t.name, "shape": list(t.shape), "offset": t.offset} for t in self.tensors]

    @classmethod
    def from_json(cls, items: list[dict]) -> "AdapterLayout":
        layout = cls(tuple(AdapterTensor(i["name"], tuple(i["shape"]), int(i["offset"])) for i in items))
        expected = 0
        for t in layout.tensors:
            if t.offset != expected or any(s <= 0 for s in t.shape):
                raise ValueError(f"adapter layout is not contiguous at {t.name}")
            expected = t.end
        return layout
