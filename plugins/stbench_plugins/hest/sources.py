"""Where ``stbench data fetch hest --ids ...`` downloads HEST-1k samples from
(:class:`stbench.fetch.HuggingFaceSource`).

HEST-1k (Jaume et al., NeurIPS 2024) is the gated Hugging Face dataset MahmoodLab/hest (CC BY-NC-SA
4.0; 743 GB whole, so samples are fetched by id). Per sample the reader needs ``st/<id>.h5ad``,
``metadata/<id>.json`` and, for its image, ``wsis/<id>.tif``; the other folders of the repository
(patches, thumbnails, segmentations, transcripts) are not fetched. The checksums come from the Hub
with the file list, at the commit ``main`` points to when the fetch starts, which is recorded.
"""

from stbench.fetch import HuggingFaceSource

SOURCE = HuggingFaceSource(
    folder="hest",  # stbench_plugins.hest.reader.FOLDER, where the reader looks ($STBENCH_DATA/hest)
    repo_id="MahmoodLab/hest",
    patterns=("st/{id}.h5ad", "metadata/{id}.json", "wsis/{id}.tif"),
    optional=("wsis/{id}.tif",),
    access="HEST-1k is gated: sign in at https://huggingface.co/datasets/MahmoodLab/hest and accept its terms, "
           "then log in here with `hf auth login` (or set HF_TOKEN to a token of that account)",
)
