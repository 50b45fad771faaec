"""The ``synthetic`` dataset: generated slides that ship with stbench (no download).

This module stays light (no numpy): it only declares the options and registers the dataset; the
generator lives in :mod:`stbench_plugins.synthetic.generate` and is imported when the dataset is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stbench import hookimpl
from stbench.specs import DatasetSpec

#: spot pitch (µm) per lattice when ``spot_pitch_um`` is not set: legacy ST and Visium.
DEFAULT_PITCH_UM = {"square": 200.0, "hex": 100.0}
#: spot diameter as a fraction of the pitch: legacy ST 100/200 µm, Visium 55/100 µm.
DIAMETER_PER_PITCH = {"square": 0.5, "hex": 0.55}


@dataclass
class SyntheticOptions:
    """Parameters of the generated dataset (``--set dataset_options.FIELD=VALUE``).

    The defaults keep a full run of a few methods to seconds.
    """

    n_patients: int = 4
    sections_per_patient: int = 2
    #: spots per section, exactly (the tissue outline is grown until it holds this many)
    spots_per_section: int = 300
    #: panel genes SG0001..; what the benchmark predicts (see ``default_panel``)
    n_genes: int = 60
    #: genes outside the panel, XG0001..; they carry most UMIs, so library-size normalisation matters
    n_extra_genes: int = 40
    #: latent spatial programmes shared by all patients; factors 0-3 also drive the image
    n_factors: int = 4
    #: "square" (legacy ST) or "hex" (Visium: offset rows, doubled column index)
    lattice: str = "square"
    #: centre-to-centre spot distance; None takes DEFAULT_PITCH_UM[lattice]
    spot_pitch_um: Optional[float] = None
    #: microns per image pixel
    mpp: float = 1.0
    #: True: an elliptical, wobbly tissue outline; False: a rectangular grid of ceil(sqrt(n)) columns
    outline: bool = True
    #: generate H&E-like images (set False for very large sections)
    images: bool = True
    seed: int = 0
    #: zero the last panel gene in the first section (exercises constant-gene handling of metrics)
    constant_gene: bool = True
    #: zero every count of one spot of the first section (exercises the library-size guard)
    zero_spot: bool = True

    def pitch_um(self) -> float:
        """The spot pitch in µm, derived from the lattice unless set."""
        if self.spot_pitch_um is not None:
            return float(self.spot_pitch_um)
        return DEFAULT_PITCH_UM.get(self.lattice, DEFAULT_PITCH_UM["square"])


@hookimpl
def stbench_register_datasets(register):
    register(
        DatasetSpec(
            name="synthetic",
            factory="stbench_plugins.synthetic.generate:open_synthetic",
            options=SyntheticOptions,
            needs_data_dir=False,
            description="generated slides with spatial expression and H&E-like images; ships with stbench",
        )
    )
