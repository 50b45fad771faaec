"""Writers of small samples in the HEST-1k layout, for tests: a pyramidal TIFF (tifffile), an ``.h5ad``
(anndata) and a metadata JSON per sample.

HEST-1k (mahmoodlab/HEST, huggingface.co/datasets/MahmoodLab/hest) keeps one sample as
``st/<id>.h5ad`` (obs ``array_row``, ``array_col``, ``pxl_col_in_fullres``, ``pxl_row_in_fullres``),
``wsis/<id>.tif`` (pyramidal generic TIFF) and ``metadata/<id>.json`` (``pixel_size_um_estimated``,
``st_technology``, ``patient``, ``organ``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np


def write_pyramid_tiff(path: Path, image: np.ndarray, levels: int = 3, mpp: Optional[float] = None,
                       tile: int = 64, compression: Optional[str] = "zlib") -> list[np.ndarray]:
    """A tiled pyramidal TIFF that OpenSlide reads as ``generic-tiff``: full resolution, then ``levels - 1``
    halvings (PIL ``reduce(2)``, a 2×2 mean) as reduced-resolution pages. Returns the levels' pixels."""
    import tifffile
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pyramid = [np.ascontiguousarray(image)]
    for _ in range(levels - 1):
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).reduce(2)))
    extra = {}
    if mpp:
        extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    kwargs = {"compressionargs": {"level": 1}} if compression == "zlib" else {}
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, level in enumerate(pyramid):
            # OpenSlide takes a page as a pyramid level only when it is tiled and, below full
            # resolution, flagged as a reduced-resolution image (NewSubfileType 1)
            tw.write(level, tile=(tile, tile), photometric="rgb", compression=compression, metadata=None,
                     subfiletype=1 if i else 0, **(extra if i == 0 else {}), **kwargs)
    return pyramid


def write_hest_sample(root: Path, sample: str, counts, genes, grid, pixel, image: Optional[np.ndarray] = None,
                      metadata: Optional[dict] = None, spot_ids=None, obs_extra: Optional[dict] = None,
                      levels: int = 3, drop_obs: tuple = ()) -> None:
    """One sample in the HEST layout under ``root``: st/<sample>.h5ad, metadata/<sample>.json and, with an
    image, wsis/<sample>.tif. ``grid`` is (x = array_col, y = array_row), ``pixel`` (x, y) full-res px."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    grid, pixel = np.asarray(grid), np.asarray(pixel, dtype=np.float64)
    n = len(grid)
    spot_ids = [f"{x}x{y}" for x, y in grid] if spot_ids is None else list(spot_ids)
    obs = pd.DataFrame({"in_tissue": np.ones(n, dtype=np.int64), "array_row": grid[:, 1], "array_col": grid[:, 0],
                        "pxl_col_in_fullres": pixel[:, 0], "pxl_row_in_fullres": pixel[:, 1]},
                       index=pd.Index(spot_ids, dtype=str))
    for key, values in (obs_extra or {}).items():
        obs[key] = values
    obs = obs.drop(columns=list(drop_obs))
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=str)))
    adata.obsm["spatial"] = pixel
    (root / "st").mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "st" / f"{sample}.h5ad")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    meta = {"id": sample, "st_technology": "Spatial Transcriptomics", "pixel_size_um_estimated": 1.0,
            "patient": "Patient 1", "organ": "Skin", "species": "Homo sapiens"}
    meta.update(metadata or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(meta), encoding="utf-8")
    if image is not None:
        write_pyramid_tiff(root / "wsis" / f"{sample}.tif", image, levels=levels,
                           mpp=meta.get("pixel_size_um_estimated"))


def toy_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An H&E-like texture: smooth colour fields plus noise, so that resampling differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([200 + 40 * np.sin(xx / 23.0), 150 + 60 * np.cos(yy / 17.0), 190 + 50 * np.sin((xx + yy) / 31.0)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def write_toy_hest(root: Path, samples=("S1", "S2", "S3", "S4"), patients=("P1", "P1", "P2", "P3"),
                   technology: str = "Spatial Transcriptomics", mpp: float = 2.0, side: int = 6,
                   genes=("G1", "G2", "G3", "G4", "G5"), image: bool = True, seed: int = 0) -> Path:
    """A small HEST dataset: ``side × side`` spots per sample on the technology's lattice, counts with a
    spatial signal that the image's brightness follows (so image-based methods learn something)."""
    rng = np.random.default_rng(seed)
    hexagonal = technology.lower() == "visium"
    pitch = 100.0 if hexagonal else 200.0
    for k, (sample, patient) in enumerate(zip(samples, patients)):
        if hexagonal:
            grid = np.array([(2 * c + r % 2, r) for r in range(side) for c in range(side)])
            um = np.column_stack([grid[:, 0] * pitch / 2, grid[:, 1] * pitch * np.sqrt(3) / 2])
        else:
            grid = np.array([(c + 3, r + 2) for r in range(side) for c in range(side)])
            um = (grid - grid.min(0)) * pitch
        pixel = (um + 150.0) / mpp
        field = np.sin(pixel[:, 0] / 60.0) + np.cos(pixel[:, 1] / 45.0) + 2.5
        counts = rng.poisson(np.outer(field, np.arange(1, len(genes) + 1)) * 4)
        img = None
        if image:
            h, w = (int(v) + int(150 / mpp) for v in pixel.max(0)[::-1])
            img = toy_image(h, w, seed + k)
            yy, xx = np.mgrid[:h, :w]
            shade = (np.sin(xx / 60.0) + np.cos(yy / 45.0) + 2.5) / 4.5  # brightness follows the counts' field
            img = np.clip(img * (0.5 + 0.5 * shade[..., None]), 0, 255).astype(np.uint8)
        write_hest_sample(root, sample, counts, genes, grid, pixel, img,
                          metadata={"st_technology": technology, "pixel_size_um_estimated": mpp, "patient": patient,
                                    "organ": "Skin" if k % 2 == 0 else "Breast"})
    return root
