"""The ``her2`` dataset: HER2-positive breast cancer, legacy Spatial Transcriptomics (her2st).

Kept light on purpose: the reader (pandas, scipy) is imported only when the dataset is opened.
"""

from stbench import hookimpl
from stbench.specs import DatasetSpec


@hookimpl
def stbench_register_datasets(register):
    register(
        DatasetSpec(
            name="her2",
            factory="stbench_plugins.her2.reader:open_her2",
            needs_data_dir=True,
            source="stbench_plugins.her2.sources:SOURCE",  # stbench data fetch her2
            description="HER2+ breast cancer, legacy ST: 36 sections of 8 patients (A-H), 13,620 spots, "
            "H&E images for C2-C6 only",
            reference="Andersson et al., Nat Commun 12, 6012 (2021), doi:10.1038/s41467-021-26271-2; "
            "data: github.com/almaan/her2st",
        )
    )
