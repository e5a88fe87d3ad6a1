"""Acquisition metadata schema (qpimage style): required and optional keys, checked on the way in."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import MetadataError

#: Units of stored values: optical path delay (nm, um), phase (rad) or dry-mass surface density (pg/um2,
#: as Q-Phase-type instruments export it; OPD = density * alpha, see ``opdcells.preprocess.to_opd_nm``).
UNITS = ("nm", "um", "rad", "pg/um2")

#: Keys every map needs before it can become OPD in nanometres at a known scale.
REQUIRED_KEYS = ("units", "pixel_size_um")
#: Keys that are stored when known; ``wavelength_nm`` becomes required when ``units == "rad"``.
OPTIONAL_KEYS = ("wavelength_nm", "medium_index")


@dataclass(frozen=True)
class Meta:
    """Metadata of one map or file. ``None`` means unknown.

    Attributes
    ----------
    units : {"nm", "um", "rad", "pg/um2"} or None
        Unit of the stored values: "nm" or "um" (optical path delay), "rad" (phase) or "pg/um2"
        (dry-mass surface density).
    wavelength_nm : float or None
        Vacuum imaging wavelength in nanometres.
    pixel_size_um : float or None
        Object-plane pixel size in micrometres.
    medium_index : float or None
        Refractive index of the medium around the cells.

    Raises
    ------
    ValueError
        For unknown units or a value that is not a positive finite number.
    """

    units: str | None = None
    wavelength_nm: float | None = None
    pixel_size_um: float | None = None
    medium_index: float | None = None

    def __post_init__(self):
        if self.units is not None and self.units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, not {self.units!r}")
        for key in ("wavelength_nm", "pixel_size_um", "medium_index"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive finite number, not {value!r}")

    def over(self, fallback: Meta) -> Meta:
        """Return metadata taking each key from ``self`` where known, else from ``fallback``.

        ``user_meta.over(file_meta)``: what the user gave wins; the file fills the gaps.
        """
        return Meta(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                       else getattr(fallback, f.name) for f in dataclasses.fields(self)})

    def missing(self) -> list[str]:
        """Names of required keys that are still unknown."""
        keys = [k for k in REQUIRED_KEYS if getattr(self, k) is None]
        if self.units == "rad" and self.wavelength_nm is None:
            keys.append("wavelength_nm")
        return keys

    def check(self, path, problems: dict[str, str] | None = None) -> Meta:
        """Raise :class:`MetadataError` naming ``path`` and the missing keys; return self if complete.

        ``problems``: key -> what the file's unusable variable for that key holds (see
        ``opdcells.readers.meta_from_variables``); named in the message when that key is missing.
        """
        missing = self.missing()
        if missing:
            problems = problems or {}
            hints = {"units": "--units " + "|".join(UNITS), "pixel_size_um": "--pixel-size-um",
                     "wavelength_nm": "--wavelength-nm"}

            def why(key: str) -> str:
                found = f"the file's {key!r} variable is {problems[key]}; " if key in problems else ""
                return f"{key} ({found}give {hints[key]} or a manifest column)"

            raise MetadataError(path, "missing metadata " + ", ".join(map(why, missing)))
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
