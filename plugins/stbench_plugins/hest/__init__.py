"""The ``hest`` dataset: samples in the HEST-1k layout (mahmoodlab/HEST), legacy ST and Visium.

Kept light on purpose: the reader (anndata, OpenSlide) is imported only when the dataset is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from stbench import hookimpl
from stbench.errors import ConfigError
from stbench.specs import DatasetSpec


@dataclass
class HestOptions:
    """Which samples to read (``--set dataset_options.FIELD=VALUE``).

    Examples: ``--set dataset_options.ids=[NCBI759,NCBI760]`` (or ``ids=NCBI759,NCBI760``),
    ``--set dataset_options.where.organ=Skin``, ``--set dataset_options.where.st_technology=[Visium]``.
    """

    #: HEST sample ids, a list or one comma-separated string; empty: every sample with an st/<id>.h5ad
    ids: Union[list, str] = field(default_factory=list)
    #: keep the samples whose metadata JSON has these values (every key must match; a list of values
    #: means any of them; compared as text, case and surrounding spaces ignored), e.g. {organ: Skin}
    where: dict = field(default_factory=dict)
    #: metadata key of the µm per full-resolution pixel; None: pixel_size_um_estimated (what HEST itself
    #: uses), else pixel_size_um_embedded
    pixel_size_key: Optional[str] = None

    def __post_init__(self):
        ids = self.ids.split(",") if isinstance(self.ids, str) else self.ids
        if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"dataset_options: key 'ids' must be sample ids such as [NCBI759, NCBI760], got {self.ids!r}")
        self.ids = [str(i).strip() for i in ids if str(i).strip()]
        for key, value in self.where.items():
            values = value if isinstance(value, list) else [value]
            if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
                raise ConfigError(f"dataset_options: where.{key} must be a value or a list of values "
                                  f"(e.g. where.organ=Skin), got {value!r}")


@hookimpl
def stbench_register_datasets(register):
    register(
        DatasetSpec(
            name="hest",
            factory="stbench_plugins.hest.reader:open_hest",
            options=HestOptions,
            needs_data_dir=True,
            description="HEST-1k samples (st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json), legacy ST and Visium; "
            "select them with dataset_options.ids or dataset_options.where",
            reference="Jaume et al., HEST-1k, NeurIPS 2024 Datasets and Benchmarks, arXiv:2406.16192; "
            "data: huggingface.co/datasets/MahmoodLab/hest",
            source="stbench_plugins.hest.sources:SOURCE",  # stbench data fetch hest --ids ...
        )
    )
