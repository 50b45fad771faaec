"""Sections, slides and the dataset interface.

A :class:`Section` is one tissue section as a dataset plugin reads it: raw counts over every measured
gene, spot coordinates in two frames (integer array/grid coordinates and full-resolution image pixels)
and the physical scale (microns per pixel). A :class:`Slide` is what a method sees: the same spots with
expression restricted to the benchmark's gene panel and normalised.

At test time a method gets a *masked* slide (:meth:`Slide.masked`): its ``expr`` is ``None`` and only the
prompt spots' expression is visible, so no method can read the truth it is scored on.

A section may have no counts at all (``counts`` is ``None``: an H&E image and spot positions, nothing
measured), the slide a trained model is asked to predict (``stbench predict``). Such a section cannot be
trained or scored on: a run leaves it out; :meth:`Slide.unmeasured` makes the slide a method predicts,
with prompt spots when some were measured separately.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np


def positions_um(obj) -> np.ndarray:
    """Spot centres in µm of a section or slide: pixels × microns per pixel, or grid × spot pitch
    when there is no image frame."""
    if obj.mpp is not None:
        return np.asarray(obj.pixel, dtype=np.float64) * obj.mpp
    return np.asarray(obj.grid, dtype=np.float64) * obj.spot_pitch_um


@dataclass(frozen=True)
class SectionInfo:
    """What a dataset knows about a section without parsing its counts."""

    name: str
    patient: str
    has_image: bool = False
    #: False for a section with an image and spot positions but no measured counts (predict only)
    has_counts: bool = True


@dataclass
class Section:
    """One tissue section, raw, as read from disk.

    Attributes:
        name: section id, unique within the dataset (``A1``).
        patient: patient id; sections of one patient are never split between train and test.
        spot_ids: (N,) spot identifiers (``"<x>x<y>"`` for legacy ST).
        genes: (G_all,) gene symbols of ``counts``' columns.
        counts: (N, G_all) raw UMI counts: a scipy sparse matrix (CSR preferred), a dense array, or a
            :class:`stbench.data.csr.CSRCounts` (CSR arrays read without scipy; it behaves as a scipy
            matrix on use); ``None`` for a section nothing was measured on (``genes`` is then empty).
            Read them through ``stbench.data.csr`` (``row_sums``, ``dense_columns``, ``as_scipy``).
        grid: (N, 2) integer array coordinates (x = column, y = row).
        pixel: (N, 2) spot centre (x, y) in full-resolution image pixels.
        mpp: microns per full-resolution pixel, or ``None`` if the section has no image frame.
        lattice: ``"square"`` (legacy ST) or ``"hex"`` (Visium).
        spot_diameter_um: physical spot diameter.
        spot_pitch_um: centre-to-centre distance of neighbouring spots.
        image_path: the full-resolution H&E image, if there is one on disk.
        image_loader: for generated data, a function returning the image as an (H, W, 3) uint8 array.
        image_key: identifies the image's content for the feature cache; required with
            ``image_loader`` (e.g. a hash of the generator's options), derived from the file otherwise.
        source_files: the files this section was read from (counts, coordinates, image). A run records
            their names, sizes and modification times, and refuses to resume over changed files.
    """

    name: str
    patient: str
    spot_ids: np.ndarray
    genes: np.ndarray
    counts: "object"  # see above; typed loosely so this module imports without scipy
    grid: np.ndarray
    pixel: np.ndarray
    mpp: Optional[float]
    lattice: str = "square"
    spot_diameter_um: float = 100.0
    spot_pitch_um: float = 200.0
    image_path: Optional[Path] = None
    image_loader: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False)
    image_key: Optional[str] = None
    source_files: tuple = ()

    @functools.cached_property
    def gene_index(self) -> dict[str, int]:
        """Gene symbol -> column of ``counts`` (built once: panel checks and every fold's slide use it)."""
        return {g: i for i, g in enumerate(np.asarray(self.genes, dtype=str).tolist())}

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_loader is not None

    @property
    def has_counts(self) -> bool:
        return self.counts is not None

    def fingerprint(self) -> list:
        """What identifies the data read: each source file's name, size and modification time (as the
        image fingerprint of the feature cache), plus the image key of generated images."""
        out = []
        for path in self.source_files:
            st = Path(path).stat()
            out.append([Path(path).name, st.st_size, st.st_mtime_ns])
        if self.image_key:
            out.append(["image_key", self.image_key])
        return out

    def image_fingerprint(self) -> str:
        """What identifies the image's content: the plugin's key, else the file's path, size and mtime."""
        if self.image_key:
            return self.image_key
        if self.image_path is not None:
            st = Path(self.image_path).stat()
            return f"{Path(self.image_path).resolve()}:{st.st_size}:{st.st_mtime_ns}"
        raise ValueError(f"section {self.name} has no image")

    def positions_um(self) -> np.ndarray:
        return positions_um(self)

    def read_image(self) -> np.ndarray:
        """The full-resolution image as an (H, W, 3) uint8 array."""
        if self.image_loader is not None:
            return self.image_loader()
        if self.image_path is None:
            raise ValueError(f"section {self.name} has no image")
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # whole-slide JPEGs exceed PIL's decompression-bomb guard
        try:
            with Image.open(self.image_path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for truncated or corrupt files
            from stbench.images.region import image_error

            raise image_error(self, exc) from None


@dataclass
class Slide:
    """A section as a method sees it: panel genes, normalised expression, coordinates, image access.

    ``expr`` is (N, G) float32 in the benchmark's normalisation (``ln(1 + CPM)`` by default). On a
    masked slide (test time) ``expr`` is ``None``; ``prompt_idx`` holds the indices of the prompt spots
    and ``prompt_expr`` their expression, in the same order.
    """

    name: str
    patient: str
    spot_ids: np.ndarray
    genes: np.ndarray
    expr: Optional[np.ndarray]
    grid: np.ndarray
    pixel: np.ndarray
    mpp: Optional[float]
    lattice: str = "square"
    spot_diameter_um: float = 100.0
    spot_pitch_um: float = 200.0
    section: Optional[Section] = field(default=None, repr=False)
    prompt_idx: Optional[np.ndarray] = None
    prompt_expr: Optional[np.ndarray] = None
    #: frozen image features prepared for the method's needs: "spot" (N, d), "neighbour" (N, 25, d) with
    #: "neighbour_mask" (N, 25), "niche" (N, d); empty when the method needs no image features
    features: dict = field(default_factory=dict)
    #: image patches prepared for the method's declared ``MethodSpec.patches``: request name (e.g.
    #: "spot-112um-224px") -> stbench.images.patches.PatchSet, whose ``patches`` is a read-only
    #: memory-mapped uint8 array (N, n_sub, px, px, 3) and ``mask`` (N, n_sub). Read batches from it; do
    #: not keep references in the method (fine-tuning deep-copies methods).
    patches: dict = field(default_factory=dict)
    #: with the ``niche_expression`` need, on training and validation slides: each spot's niche
    #: profile (N, G) (the normalisation of the mean raw counts of the spot and its lattice neighbours);
    #: None on a test slide (it is truth). ``niche_complete`` (N,) flags spots whose every lattice
    #: neighbour is present, on every slide.
    niche_expr: Optional[np.ndarray] = None
    niche_complete: Optional[np.ndarray] = None

    @property
    def n_spots(self) -> int:
        return len(self.spot_ids)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def has_image(self) -> bool:
        return self.section is not None and self.section.has_image

    @property
    def is_masked(self) -> bool:
        return self.expr is None

    def positions_um(self) -> np.ndarray:
        return positions_um(self)

    def masked(self, prompt_idx: np.ndarray) -> "Slide":
        """A copy that hides the truth except at ``prompt_idx`` (what a method gets at test time)."""
        if self.expr is None:
            raise ValueError(f"slide {self.name} is already masked")
        prompt_idx = np.asarray(prompt_idx, dtype=np.int64)
        # the section stays for image access, without its raw counts (they are the truth too)
        section = dataclasses.replace(self.section, counts=None) if self.section is not None else None
        return dataclasses.replace(
            self, expr=None, prompt_idx=prompt_idx, prompt_expr=self.expr[prompt_idx].copy(), section=section,
            niche_expr=None,
        )

    @classmethod
    def unmeasured(cls, section: Section, genes, prompt_idx: Optional[np.ndarray] = None,
                   prompt_expr: Optional[np.ndarray] = None, niche: bool = False) -> "Slide":
        """The slide a method predicts on a section without (or ignoring) its counts: ``expr`` is None,
        as on a masked test slide, with ``prompt_idx`` / ``prompt_expr`` (normalised panel expression)
        when some spots were measured. ``niche``: flag the spots whose lattice niche is complete (the
        niche_expression need)."""
        complete = None
        if niche:
            from stbench.data.expression import NICHE_SIZE
            from stbench.images.geometry import lattice_neighbours

            complete = np.array([len(nb) == NICHE_SIZE[section.lattice]
                                 for nb in lattice_neighbours(section.grid, section.lattice)], dtype=bool)
        if prompt_idx is not None:
            prompt_idx = np.asarray(prompt_idx, dtype=np.int64)
            prompt_expr = np.asarray(prompt_expr, dtype=np.float32)
            if prompt_expr.shape != (len(prompt_idx), len(genes)):
                raise ValueError(f"prompt expression has shape {prompt_expr.shape}, expected ({len(prompt_idx)}, {len(genes)})")
        return cls(
            name=section.name, patient=section.patient, spot_ids=np.asarray(section.spot_ids),
            genes=np.asarray(list(genes)), expr=None, grid=section.grid, pixel=section.pixel, mpp=section.mpp,
            lattice=section.lattice, spot_diameter_um=section.spot_diameter_um, spot_pitch_um=section.spot_pitch_um,
            section=dataclasses.replace(section, counts=None), prompt_idx=prompt_idx, prompt_expr=prompt_expr,
            niche_complete=complete,
        )

    def prompt_mask(self) -> np.ndarray:
        """Boolean (N,) flag of the prompt spots (all False when there are none)."""
        mask = np.zeros(self.n_spots, dtype=bool)
        if self.prompt_idx is not None:
            mask[self.prompt_idx] = True
        return mask


class Dataset:
    """The interface a dataset plugin implements.

    A dataset lists its sections cheaply (:meth:`sections`) and parses one on demand
    (:meth:`load_section`), raising :class:`stbench.errors.DataError` with a one-line message naming the
    file, the field and the fix for malformed input. Parsing should be cached on disk by the plugin when
    it is slow (see :mod:`stbench.data.cache`).
    """

    #: dataset name, as registered
    name: str = ""
    #: short description of where the data comes from
    description: str = ""

    def sections(self) -> list[SectionInfo]:
        raise NotImplementedError

    def load_section(self, name: str) -> Section:
        raise NotImplementedError

    def default_panel(self) -> Optional[list[str]]:
        """The dataset's published gene panel, if it has one (else the benchmark computes one)."""
        return None
