"""The timm encoders: registration, random init, local weights, the safe loader, missing weights, OOM back-off.

Only resnet18 is ever built (fast on CPU); UNI is tested up to its weights checks, which run before its
ViT-L would be built. Nothing here touches the network.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from stbench.errors import ConfigError, DataError
from stbench.images.encoder import file_digest
from stbench.specs import resolve
import stbench_plugins.timm_encoders as plugin
from stbench_plugins.timm_encoders import model as tm


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No hub access, and empty caches: whatever this machine has downloaded does not leak into tests."""
    import huggingface_hub.constants

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(var, str(empty))
    # huggingface_hub reads its cache location once, at import: point the live value at the empty dir too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.delenv("STBENCH_UNI_WEIGHTS", raising=False)
    return empty


def _patches(n=4, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference():
    """A random-init resnet18 and its features on a fixed batch, built once for the module."""
    enc = tm.resnet18("random")
    return enc, enc.encode(_patches())


def _malicious(marker):
    """An object whose unpickling writes ``marker`` (stands in for os.system & co)."""

    class Payload:
        def __reduce__(self):
            return exec, (f"with open({str(marker)!r}, 'w') as fh: fh.write('pwned')",)

    return Payload()


# -- registration ------------------------------------------------------------------------------------------------

def test_registers_five_encoders_with_lazy_factories():
    specs = []
    plugin.stbench_register_encoders(register=specs.append)
    assert [s.name for s in specs] == ["resnet18", "resnet50", "densenet121", "vit_small", "uni"]
    for spec in specs:
        assert isinstance(spec.factory, str) and callable(resolve(spec.factory))
        assert "weights" in spec.description
    uni = specs[-1]
    assert "huggingface.co/MahmoodLab/UNI" in uni.description
    assert "10.1038/s41591-024-02857-3" in uni.extra["reference"]


def test_plugin_module_does_not_import_torch():
    code = "import sys, stbench_plugins.timm_encoders; print('torch' in sys.modules or 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- random init -----------------------------------------------------------------------------------------------

def test_random_init_resnet18_encodes_and_is_repeatable(reference):
    enc, feats = reference
    assert feats.shape == (4, 512) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert enc.weights_id == "random-init" and enc.dim == 512 and enc.input_size == 224
    assert enc.describe()["precision"] == "float32"  # CPU
    np.testing.assert_array_equal(tm.resnet18("random").encode(_patches()), feats)


# -- weights from a file -------------------------------------------------------------------------------------------

def test_weights_from_pth_and_safetensors_match_the_source_model(reference, tmp_path):
    from safetensors.torch import save_file

    enc, feats = reference
    sd = enc.model.state_dict()
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save({"state_dict": sd, "epoch": 3}, pth)  # a wrapped training checkpoint
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for path in (pth, st):
        loaded = tm.resnet18(str(path))
        assert loaded.weights_id == file_digest(path)
        np.testing.assert_allclose(loaded.encode(_patches()), feats, rtol=1e-5, atol=1e-5)

    changed = dict(sd)
    changed["conv1.weight"] = sd["conv1.weight"] + 1.0
    torch.save(changed, tmp_path / "changed.pth")
    assert tm.resnet18(str(tmp_path / "changed.pth")).weights_id != tm.resnet18(str(pth)).weights_id


def test_classifier_head_in_checkpoint_is_dropped(reference, tmp_path):
    enc, feats = reference
    sd = dict(enc.model.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(sd, tmp_path / "with_head.pth")
    np.testing.assert_allclose(tm.resnet18(str(tmp_path / "with_head.pth")).encode(_patches()), feats,
                               rtol=1e-5, atol=1e-5)


def test_safe_loader_refuses_malicious_pickle(tmp_path):
    # the payload is live: the ordinary unpickler does run it
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_malicious(proof)))
    assert proof.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _malicious(marker)}, evil)
    with pytest.raises(DataError, match="arbitrary Python objects") as info:
        tm.load_state_dict_safely(evil)
    assert str(evil) in str(info.value) and ".safetensors" in str(info.value)
    with pytest.raises(DataError):
        tm.resnet18(str(evil))
    assert not marker.exists()


def test_wrong_keys_missing_file_and_non_tensor_files(reference, tmp_path):
    sd = dict(reference[0].model.state_dict())
    sd["bogus.weight"] = sd.pop("conv1.weight")
    torch.save(sd, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match=r"bogus\.weight") as info:
        tm.resnet18(str(tmp_path / "wrong.pth"))
    assert "conv1.weight" in str(info.value) and str(tmp_path / "wrong.pth") in str(info.value)

    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(DataError, match="not found") as info:
        tm.resnet18(str(missing))
    assert str(missing) in str(info.value) and "\n" not in str(info.value)  # one line for the CLI

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(DataError, match="mapping of parameter names to tensors"):
        tm.load_state_dict_safely(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_text("<html>not found</html>")
    with pytest.raises(DataError, match="not a PyTorch weights file"):
        tm.load_state_dict_safely(tmp_path / "junk.pth")


# -- no weights given ---------------------------------------------------------------------------------------------

def test_no_weights_and_empty_cache_is_a_config_error():
    with pytest.raises(ConfigError, match="--encoder-weights") as info:
        tm.resnet18(None)
    assert "random" in str(info.value) and "\n" not in str(info.value)


def test_no_weights_uses_a_local_hf_cache(reference, _offline):
    """A file an earlier timm download left in the HF cache layout is picked up, without any request."""
    from safetensors.torch import save_file

    enc, feats = reference
    snapshot = _offline / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (_offline / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (_offline / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(snapshot / "model.safetensors"))
    cached = tm.resnet18(None)
    assert cached.weights_id == file_digest(snapshot / "model.safetensors")
    assert cached.describe()["weights_source"] == "timm-cache"
    np.testing.assert_allclose(cached.encode(_patches()), feats, rtol=1e-5, atol=1e-5)


def test_uni_without_weights_says_where_to_get_them(monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as info:
        tm.uni(None)
    msg = str(info.value)
    assert "huggingface.co/MahmoodLab/UNI" in msg and "STBENCH_UNI_WEIGHTS" in msg and "--encoder-weights" in msg

    missing = tmp_path / "uni" / "pytorch_model.bin"
    monkeypatch.setenv("STBENCH_UNI_WEIGHTS", str(missing))
    with pytest.raises(DataError, match="STBENCH_UNI_WEIGHTS") as info:
        tm.uni(None)
    assert str(missing) in str(info.value)


# -- memory ---------------------------------------------------------------------------------------------------------

def test_batch_size_halves_on_out_of_memory(reference, monkeypatch):
    enc = tm.resnet18("random")
    forward = enc.model.forward

    def small_batches_only(x):
        if x.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    monkeypatch.setattr(enc.model, "forward", small_batches_only)
    enc.batch_size = 16
    feats = enc.encode(_patches())
    assert enc.batch_size <= 2
    np.testing.assert_allclose(feats, reference[1], rtol=1e-5, atol=1e-5)

    # any other RuntimeError is a bug and is not swallowed
    monkeypatch.setattr(enc.model, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        enc.encode(_patches())
