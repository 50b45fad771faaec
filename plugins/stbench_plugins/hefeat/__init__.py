"""``hefeat``: an offline H&E patch encoder built from classical histology features (no weights, CPU).

The default encoder for CPU runs and the CPU leaderboards: nothing to download, deterministic, and
thousands of 64-px patches per second on two cores. It describes a patch by

* colour deconvolution of the optical density into haematoxylin, eosin and residual channels with the
  Ruifrok H-E-DAB stain matrix (Ruifrok & Johnston, "Quantification of histochemical staining by color
  deconvolution", Anal Quant Cytol Histol 23:291-299, 2001): mean, std and 10/50/90th percentiles;
* tissue: the background (glass) fraction and the mean RGB of the tissue;
* nuclear density: the fraction of haematoxylin-rich pixels at three levels, and a count of nuclei
  (prominent local maxima of the smoothed haematoxylin channel) per 100 px;
* texture at 1.75, 3.5 and 7 µm/px of the H, E and grey images: gradient magnitude, local std and
  Laplacian energy;
* coarse layout: H and E means in the four quadrants and the central window where the spot sits.

``stbench_plugins.hefeat.features.FEATURE_NAMES`` names every column.
"""

from stbench import hookimpl
from stbench.specs import EncoderSpec


@hookimpl
def stbench_register_encoders(register):
    register(
        EncoderSpec(
            name="hefeat",
            factory="stbench_plugins.hefeat.features:HEFeatures",
            description="offline H&E features: colour deconvolution, nuclear density, multi-scale texture (no weights, CPU)",
        )
    )
