"""CLIP teacher: reproduces the published target on the reference fixture; every checkpoint route agrees."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from itpn_ds.teacher import load_teacher
from itpn_ds.teacher.clip import TeacherLoadError, load_clip_teacher

REFERENCE = Path(__file__).parent / "data" / "reference" / "clip_teacher.pt"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data = torch.load(REFERENCE, weights_only=True)
    path = tmp_path_factory.mktemp("ref") / "openai_state_dict.pt"
    torch.save(data["state_dict"], path)
    return data, path


def test_reproduces_reference_targets(reference):
    data, path = reference
    teacher = load_clip_teacher(path)
    assert (teacher.resolution, teacher.num_tokens, teacher.dim) == (56, 16, 64)
    out = teacher(data["images"])
    assert out.dtype == torch.float32 and out.shape == data["targets"].shape
    torch.testing.assert_close(out, data["targets"], atol=1e-5, rtol=0)


def test_torchscript_archive_matches_state_dict(reference, tmp_path):
    from open_clip.model import build_model_from_openai_state_dict

    data, path = reference
    model = build_model_from_openai_state_dict(dict(data["state_dict"]), cast_dtype=torch.float32).float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_image": (data["images"],)}, check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    teacher = load_clip_teacher(tmp_path / "ViT-tiny.pt")
    torch.testing.assert_close(teacher(data["images"]), data["targets"], atol=1e-5, rtol=0)
    with pytest.raises(TeacherLoadError, match="does not match arch 'ViT-L-14'"):
        load_clip_teacher(tmp_path / "ViT-tiny.pt", arch="ViT-L-14")


def test_open_clip_checkpoint_with_config_json(reference, tmp_path):
    data, path = reference
    config = {"embed_dim": 64, "quick_gelu": True,
              "vision_cfg": {"image_size": 56, "layers": 2, "width": 128, "patch_size": 14},
              "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1}}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    state = {f"module.{k}": v for k, v in data["state_dict"].items()}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "open_clip.pt")
    teacher = load_teacher(str(tmp_path / "tiny.json"), tmp_path / "open_clip.pt")
    assert teacher.identity.arch == "tiny"
    torch.testing.assert_close(teacher(data["images"]), data["targets"], atol=1e-5, rtol=0)


def test_tiny_fixtures_agree_across_formats(tiny_clip_checkpoint, tiny_open_clip_checkpoint, tmp_path):
    """The fixture teacher in OpenAI format and as an open_clip checkpoint + config: same targets, own
    identities, also from a half-precision checkpoint at another resolution; an open_clip checkpoint under
    another architecture is refused naming the file."""
    checkpoint, config = tiny_open_clip_checkpoint
    openai, open_clip = load_clip_teacher(tiny_clip_checkpoint), load_clip_teacher(checkpoint, arch=str(config))
    assert (open_clip.resolution, open_clip.num_tokens, open_clip.dim) == (56, 16, 32)
    assert (openai.identity.arch, open_clip.identity.arch) == ("openai:vit-w64-l2-p14", "tiny-clip")
    assert openai.identity.checkpoint_sha256 != open_clip.identity.checkpoint_sha256
    images = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(open_clip(images), openai(images), atol=1e-5, rtol=0)
    assert load_clip_teacher(checkpoint, arch=str(config), resolution=112).num_tokens == 64  # 8 x 8 grid
    half = torch.load(checkpoint, weights_only=False)  # open_clip checkpoints are often saved in fp16
    half["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in half["state_dict"].items()}
    torch.save(half, tmp_path / "half.pt")
    assert load_clip_teacher(tmp_path / "half.pt", arch=str(config), resolution=112).num_tokens == 64
    with pytest.raises(TeacherLoadError, match=f"{checkpoint.name} does not fit arch 'ViT-B-16'"):
        load_clip_teacher(checkpoint, arch="ViT-B-16")


def test_vit_b16_by_config_name_and_in_openai_format(tmp_path):
    """A full-size ViT-B/16 (random weights): 224 px, 14 x 14 tokens of 512 through the open_clip config name,
    and the same file read as OpenAI format is recognized as ViT-B-16 from its shapes."""
    import open_clip

    torch.save(open_clip.create_model("ViT-B-16", pretrained=None).state_dict(), tmp_path / "b16.pt")
    images = torch.rand(1, 3, 224, 224)
    for teacher, arch in ((load_clip_teacher(tmp_path / "b16.pt", arch="ViT-B-16"), "ViT-B-16"),
                          (load_clip_teacher(tmp_path / "b16.pt"), "openai:ViT-B-16")):
        assert (teacher.identity.arch, teacher.resolution, teacher.num_tokens, teacher.dim) == (arch, 224, 196, 512)
        assert teacher(images).shape == (1, 196, 512)


def test_identity_frozen_and_resolution(reference):
    data, path = reference
    teacher = load_clip_teacher(path, resolution=28)
    assert (teacher.num_tokens, teacher.identity.resolution) == (4, 28)
    assert len(teacher.identity.checkpoint_sha256) == 64
    assert teacher(torch.rand(2, 3, 28, 28)).shape == (2, 4, 64)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match=r"takes \(B, 3, 28, 28\)"):
        teacher(data["images"])


def test_missing_or_wrong_checkpoint_is_named(tmp_path):
    with pytest.raises(TeacherLoadError, match="not found: nothing is downloaded.*--teacher-checkpoint"):
        load_clip_teacher(tmp_path / "ViT-L-14.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(TeacherLoadError, match="not an OpenAI-format CLIP"):
        load_clip_teacher(tmp_path / "other.pt")
    with pytest.raises(TeacherLoadError, match="unknown open_clip architecture 'ViT-Nope'"):
        load_clip_teacher(tmp_path / "other.pt", arch="ViT-Nope")
