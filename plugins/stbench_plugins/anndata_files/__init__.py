"""The ``anndata`` dataset: spatial samples stored as AnnData ``.h5ad`` files, listed in a manifest.

The folder is not called ``anndata`` so that it never shadows the library. Kept light on purpose: the
reader (anndata, pandas, scipy) is imported only when the dataset is opened.
"""

from stbench import hookimpl
from stbench.specs import DatasetSpec


@hookimpl
def stbench_register_datasets(register):
    register(
        DatasetSpec(
            name="anndata",
            factory="stbench_plugins.anndata_files.reader:open_anndata",
            needs_data_dir=True,
            description="your spatial samples as .h5ad files (raw counts, obsm['spatial'] in full-resolution "
            "pixels), listed in manifest.csv (sample, patient, h5ad, image, mpp[, lattice])",
            reference="AnnData on-disk format (anndata.readthedocs.io); the layout of HEST-1k's st/<id>.h5ad",
        )
    )
