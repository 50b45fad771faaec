"""stbench.weights: a Lightning-style checkpoint (the Ciga et al. ResNet-18 layout) for the frozen
resnet18 encoder, loaded without running pickled code."""

import numpy as np
import torch

from stbench_plugins.timm_encoders import model as tm


def test_a_lightning_style_checkpoint_loads_into_the_resnet18_encoder(tmp_path):
    reference = tm.resnet18("random")
    sd = {f"model.resnet.{k}": v for k, v in reference.model.state_dict().items()}
    sd["model.resnet.fc.weight"] = torch.zeros(10, 512)  # the classifier the encoder does not have
    path = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "state_dict": sd}, path)  # plain types only
    loaded = tm.resnet18(str(path))
    patches = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.encode(patches), reference.encode(patches), rtol=1e-5, atol=1e-5)
