"""Phase retrieval settings for interferograms (off-axis holograms, QLSI) and the sign of the result.

Shared by the hologram reader of :mod:`opdcells.readers` (qpretrieve on array files) and the
qpformat-backed readers of :mod:`opdcells.readers_qpformat` (qpformat/qpimage calling qpretrieve), so
that ``--sideband``, ``--filter-name`` and ``--filter-size`` mean the same for every hologram.

Off-axis holograms carry two conjugate sidebands in Fourier space; qpretrieve finds one by a heuristic
(``find_peak_cosine``) and which one it lands on decides the sign of the phase: the wrong one gives a cell
darker than its background, which no later step can tell from a real map. ``sideband="auto"`` keeps the
sideband qpretrieve found and, where the object's integrated phase comes out negative against the
background, takes the conjugate (the other sideband), so a cell is always optically denser than its
medium (true for cells in aqueous media: protein raises the refractive index, Barer 1952).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Values of ``--sideband``: "auto" (cell positive against the background), "+1" (the sideband
#: qpretrieve finds), "-1" (its conjugate, qpretrieve's ``invert_phase``).
SIDEBANDS = ("auto", "+1", "-1")
#: Fourier filters of qpretrieve (``qpretrieve.filter.available_filters``, qpretrieve 0.7).
FILTER_NAMES = ("disk", "smooth disk", "gauss", "square", "smooth square", "tukey")
#: Pixels whose phase departs from the background by at least this fraction of the largest departure
#: make up the object whose integrated phase decides the sign (robust to noise and to a faint halo).
OBJECT_FRACTION = 0.5


@dataclass(frozen=True)
class Retrieval:
    """How interferograms become phase.

    Parameters
    ----------
    sideband : {"auto", "+1", "-1"}
        "+1": the sideband qpretrieve finds; "-1": its conjugate (the phase negated);
        "auto": "+1" unless the object comes out below the background, then "-1".
    filter_name : str, optional
        qpretrieve Fourier filter (one of :data:`FILTER_NAMES`); None: qpretrieve's default ("disk").
    filter_size : float, optional
        qpretrieve filter size as a fraction of the distance between central band and sideband
        (qpretrieve's "sideband distance" interpretation, 0 < size < 1); None: qpretrieve's default (1/3).

    Raises
    ------
    ValueError
        For an unknown sideband or filter, or a filter size outside (0, 1).
    """

    sideband: str = "auto"
    filter_name: str | None = None
    filter_size: float | None = None

    def __post_init__(self):
        if self.sideband not in SIDEBANDS:
            raise ValueError(f"sideband must be one of {SIDEBANDS}, not {self.sideband!r}")
        if self.filter_name is not None and self.filter_name not in FILTER_NAMES:
            raise ValueError(f"filter_name must be one of {FILTER_NAMES}, not {self.filter_name!r}")
        if self.filter_size is not None and not 0 < self.filter_size < 1:
            raise ValueError(f"filter_size must lie between 0 and 1, not {self.filter_size!r}")

    @property
    def is_default(self) -> bool:
        return self == Retrieval()

    def qpretrieve_kw(self) -> dict:
        """Keyword arguments for ``qpretrieve.OffAxisHologram`` (and qpformat's ``qpretrieve_kw``)."""
        kw = {"invert_phase": self.sideband == "-1"}
        if self.filter_name is not None:
            kw["filter_name"] = self.filter_name
        if self.filter_size is not None:
            kw["filter_size"] = self.filter_size
        return kw

    def as_dict(self) -> dict:
        return {"sideband": self.sideband, "filter_name": self.filter_name, "filter_size": self.filter_size}


def object_sign(phase: np.ndarray) -> int:
    """+1 when the object in an unwrapped phase map (rad) lies above its background, else -1.

    The background is the median of the image border; the object is every pixel departing from it by at
    least :data:`OBJECT_FRACTION` of the largest departure; the sign is that of its integrated departure.
    Non-finite pixels are ignored. A flat map counts as +1.

    Parameters
    ----------
    phase : (H, W) ndarray
        Unwrapped phase (rad).

    Returns
    -------
    int
        +1 or -1.
    """
    phase = np.asarray(phase, dtype=np.float64)
    border = np.concatenate([phase[0], phase[-1], phase[1:-1, 0], phase[1:-1, -1]])
    departure = phase - np.nanmedian(border)
    finite = departure[np.isfinite(departure)]
    if finite.size == 0:
        return 1
    largest = np.max(np.abs(finite))
    if largest == 0:
        return 1
    return 1 if finite[np.abs(finite) >= OBJECT_FRACTION * largest].sum() >= 0 else -1


def orient_phase(phase: np.ndarray, retrieval: Retrieval,
                 where: str = "<hologram>") -> tuple[np.ndarray, int]:
    """Apply ``retrieval.sideband`` to a phase map retrieved with ``retrieval.qpretrieve_kw()``.

    Parameters
    ----------
    phase : (H, W) ndarray
        Unwrapped phase (rad) with qpretrieve's sideband.
    retrieval : Retrieval
        The sideband ("auto", "+1" or "-1") and filter.
    where : str
        What the log line names.

    Returns
    -------
    tuple of (ndarray, int)
        The phase (negated where "auto" chose the conjugate sideband) and the sideband used (+1 or -1),
        which is logged at INFO level naming ``where``.
    """
    if retrieval.sideband != "auto":
        sideband = int(retrieval.sideband)
        log.info("%s: sideband %+d (given)", where, sideband)
        return phase, sideband
    sideband = object_sign(phase)
    log.info("%s: sideband %+d (auto: the cell %s its background with qpretrieve's sideband)", where,
             sideband, "lies above" if sideband > 0 else "lay below")
    return (phase if sideband > 0 else -phase), sideband


#: Spatial frequencies (cycles per pixel, radius) below this belong to the image content; an off-axis
#: hologram's carrier lies beyond (usually near 1/4 to 1/3, the sampling that separates the sidebands).
CARRIER_MIN_FREQUENCY = 0.1
#: An image is hologram-like when more than this fraction of its (mean-removed) spectral energy lies
#: beyond :data:`CARRIER_MIN_FREQUENCY` ...
HOLOGRAM_OUTER_ENERGY = 0.5
#: ... and more than this fraction of that energy sits in the strongest 1% of those frequencies
#: (a carrier peak). Measured: raw holograms 0.79-1.0 and 0.92-0.97; phase and OPD maps (real RBC,
#: HL60, Phasics, Q-Phase fields, wrapped phase) at most 0.59 and 0.65.
HOLOGRAM_PEAK_CONCENTRATION = 0.8


def looks_like_hologram(image: np.ndarray) -> bool:
    """Whether a 2-D image looks like a raw off-axis hologram: its spectrum is dominated by a narrow
    carrier peak at high spatial frequency (thresholds :data:`HOLOGRAM_OUTER_ENERGY`,
    :data:`HOLOGRAM_PEAK_CONCENTRATION`). Non-finite pixels count as the mean.

    Parameters
    ----------
    image : ndarray
        The image (False unless 2-D).

    Returns
    -------
    bool
    """
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    if image.ndim != 2 or not finite.any():
        return False
    image = np.where(finite, image, image[finite].mean()) - image[finite].mean()
    energy = np.abs(np.fft.fftshift(np.fft.fft2(image))) ** 2
    rows, cols = energy.shape
    yy, xx = np.ogrid[:rows, :cols]
    outer = energy[np.hypot((yy - rows // 2) / rows, (xx - cols // 2) / cols) > CARRIER_MIN_FREQUENCY]
    total = energy.sum()
    if total == 0 or outer.size == 0:
        return False
    strongest = np.sort(outer)[::-1][:max(1, outer.size // 100)]
    return bool(outer.sum() / total > HOLOGRAM_OUTER_ENERGY
                and strongest.sum() / outer.sum() > HOLOGRAM_PEAK_CONCENTRATION)
