"""Augmentation settings both input backends read the same way."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DataError

__all__ = ["pad_size", "RandAugmentSpec"]


def pad_size(size: int) -> int:
    """Padding of the small-image pad-and-crop augmentation (4 px at 32 px)."""
    return max(1, size // 8)


@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment string, e.g. `rand-m9-n2-mstd0.5`: magnitude m of mmax (default 10), n ops per
    image (default 2), magnitude noise std mstd (default 0), and the other timm keys as given."""

    text: str
    m: int = 9
    n: int = 2
    mstd: float = 0.0
    mmax: int = 10
    extra: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        parts = text.split("-")
        if parts[0] != "rand":
            raise DataError(f"--randaug '{text}' is not a RandAugment string (rand-m9-n2-mstd0.5, ...)")
        values: dict = {}
        extra = []
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", part)
            key = m.group(1) if m else None
            if key in ("m", "n", "mmax") and m.group(2).isdigit():
                values[key] = int(m.group(2))
            elif key == "mstd":
                values["mstd"] = float(m.group(2))
            elif key in ("inc", "w", "p", "mmin"):
                extra.append(part)
            else:
                raise DataError(f"--randaug '{text}': cannot read '{part}'")
        return cls(text, **values, extra=tuple(extra))

    def check_dali(self) -> None:
        """DataError unless DALI's RandAugment can honour the string as timm reads it (m, n, mmax only)."""
        if self.mstd or self.extra:
            raise DataError(f"--randaug '{self.text}' under --dali: DALI's RandAugment takes only m, n and mmax "
                            "(no magnitude noise mstd or other timm keys); use e.g. rand-m9-n2, or the torch loader")
