"""The ``visium`` dataset: 10x Visium samples as Space Ranger writes them, listed in a small manifest.

Kept light on purpose: the reader (h5py, pandas, scipy) is imported only when the dataset is opened.
"""

from stbench import hookimpl
from stbench.specs import DatasetSpec


@hookimpl
def stbench_register_datasets(register):
    register(
        DatasetSpec(
            name="visium",
            factory="stbench_plugins.visium.reader:open_visium",
            needs_data_dir=True,
            description="your 10x Visium samples: one Space Ranger output folder each, listed in manifest.csv "
            "(sample, patient, folder, image) with the full-resolution H&E",
            reference="10x Genomics Space Ranger outputs: filtered_feature_bc_matrix.h5, spatial/tissue_positions.csv",
        )
    )
