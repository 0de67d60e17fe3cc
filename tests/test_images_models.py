"""Your own vision models: factories in kd's, torchvision's or timm's style, models returning a
tensor, a tuple, a dict or a ModelOutput, a Hugging Face image classifier as the teacher, and
`label.arch` / `teacher --arch` without another architecture's kwargs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kd.cli import distill, label, prepare, teacher
from kd.cli import eval as eval_stage
from kd.errors import ConfigError
from kd.files import read_json
from kd.speed import count_params
from kd.tasks import image_models
from tests.helpers import invoke, ok

ZOO = '''
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


class Net(nn.Module):
    """A small conv net; `style` picks what forward returns."""

    def __init__(self, channels, num_classes, style="tensor", width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(width, num_classes)
        self.style = style

    def forward(self, x):
        logits = self.fc(self.body(x))
        if self.style == "tuple":
            return logits, x.mean()
        if self.style == "dict":
            return {"features": x, "logits": logits}
        if self.style == "output":
            return ImageClassifierOutput(logits=logits)
        if self.style == "bad":
            return {"scores": logits}
        return logits


def kd_style(input_shape, num_classes, width=4):
    return Net(input_shape[0], num_classes, width=width)


def torchvision_style(*, weights=None, **kwargs):  # like torchvision.models.resnet18
    return Net(1, kwargs.pop("num_classes"), **kwargs)


def torchvision_rgb(*, weights=None, num_classes=1000):  # a 3-channel stem, as torchvision's models have
    return Net(3, num_classes)


def timm_style(num_classes=1000, in_chans=3, style="tensor"):
    return Net(in_chans, num_classes, style=style)


class InChannels(Net):
    def __init__(self, num_classes, in_channels, width=4):
        super().__init__(in_channels, num_classes, width=width)


def no_classes(input_shape, width=4):
    return Net(input_shape[0], 10)
'''


@pytest.fixture
def zoo(workdir: Path) -> str:
    """A user's model module in the working directory (`kd` finds it there), unique per test."""
    name = f"zoo_{workdir.name.replace('-', '_').replace('[', '_').replace(']', '_')}"
    (workdir / f"{name}.py").write_text(textwrap.dedent(ZOO))
    return name


def folder(root: Path, classes: int = 3, per_class: int = 12, test: int = 4, size=(8, 8)) -> Path:
    """train/ and test/ class folders of grayscale images whose brightness tells the class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(40 + 80 * c, 20, size[::-1]), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / f"c{c}" / f"{i}.png")
    return root


# --- what kd passes, what it takes back --------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("arch, kwargs, channels", [
    ("kd_style", {"width": 3}, 1), ("torchvision_style", {"style": "tuple"}, 1), ("timm_style", {"style": "dict"}, 2),
    ("timm_style", {"style": "output"}, 3), ("InChannels", {}, 2),
])
def test_factory_signature_decides_what_is_passed_and_any_output_gives_logits(zoo, arch, kwargs, channels):
    torch.manual_seed(0)
    model = image_models.build(f"{zoo}:{arch}", kwargs, [channels, 5, 6], 7)
    x = torch.randn(4, channels, 5, 6)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 7)
    assert torch.equal(logits, model.fc(model.body(x)))  # the net's own logits, whatever it returned
    assert model.body[0].in_channels == channels  # in_chans / in_channels from the data


@pytest.mark.unit
def test_wrong_factories_and_outputs_get_one_line(zoo):
    with pytest.raises(ConfigError, match=r"no_classes\(input_shape, width=4\) takes no num_classes; kd passes "
                                          "num_classes, plus input_shape, in_chans or in_channels"):
        image_models.build(f"{zoo}:no_classes", {}, [1, 4, 4], 3)
    with pytest.raises(ConfigError, match=r"bad arch_kwargs \{'depth': 2\} for timm_style\(num_classes=1000, "
                                          r"in_chans=3, style='tensor'\)"):
        image_models.build(f"{zoo}:timm_style", {"depth": 2}, [1, 4, 4], 3)
    with pytest.raises(ConfigError, match="arch_kwargs sets in_chans, which kd passes from the data"):
        image_models.build(f"{zoo}:timm_style", {"in_chans": 3}, [1, 4, 4], 3)
    with pytest.raises(ConfigError, match=r"the model returned dict with keys \['scores'\]; expected a tensor of "
                                          "logits, a tuple \\(logits first\\), or a dict or ModelOutput with 'logits'"):
        image_models.build(f"{zoo}:timm_style", {"style": "bad"}, [1, 4, 4], 3)  # found as it is built


# --- a custom teacher through the stages --------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("store", ["pixels", "png"])
def test_torchvision_style_teacher_from_params_through_label_distill_eval(zoo, workdir, write_params, store):
    """A timm-style teacher and a torchvision-style student through every stage, from images
    stored as uint8 pixels or as PNG files (prepare.store)."""
    folder(workdir / "imgs")
    arch = f"{zoo}:timm_style"
    params = write_params(
        prepare={"dataset": "imgs", "labeled": 24, "unlabeled": 12, "test": None, "store": store},
        teacher={"arch": arch, "arch_kwargs": {"style": "output"}, "epochs": 2, "batch_size": 8, "shift": 1},
        label={"arch": arch, "arch_kwargs": {"style": "output"}, "top_k": 2, "temperatures": [1, 4]},
        students={"small": {"arch": f"{zoo}:torchvision_style", "arch_kwargs": {"style": "tuple"}, "epochs": 1,
                            "batch_size": 8, "loss": {"soft": {"weight": 0.9, "temperature": 4},
                                                      "hard": {"weight": 0.1}}}},
        eval={"latency_runs": 2, "throughput_runs": 1, "throughput_batch": 8},
    )
    ok(invoke(prepare.main, "--params", params))
    assert ("image" in pq.read_schema(workdir / "data" / "prepared" / "test.parquet").names) == (store == "png")
    ok(invoke(teacher.main, "--params", params, "--no-progress"))
    ok(invoke(label.main, "--params", params, "--no-progress"))
    manifest = read_json(workdir / "data" / "teacher_outputs" / "manifest.json")
    assert manifest["teacher"]["config"]["arch"] == arch and manifest["label"]["arch"] == arch
    assert manifest["splits"]["test"]["samples"] == 12  # the test folder
    ok(invoke(distill.main, "small", "--params", params, "--no-progress"))
    ok(invoke(eval_stage.main, "small", "--params", params))
    metrics = read_json(workdir / "data" / "students" / "small" / "metrics.json")
    net = image_models.build(arch, {"style": "output"}, [1, 8, 8], 3)
    assert metrics["teacher_params"] == count_params(net) == manifest["teacher"]["config"]["params"]
    # kd eval never imports the factory: the throughput kd label measured gives the speedup
    assert metrics["teacher_throughput_source"] == "manifest" and metrics["speedup_vs_teacher"] == pytest.approx(
        metrics["throughput"] / manifest["teacher"]["config"]["throughput"])


@pytest.mark.integration
@pytest.mark.parametrize("channels", [None, 3])
def test_grayscale_images_for_a_three_channel_factory_convert_or_stop_in_one_line(zoo, workdir, write_params,
                                                                                  channels):
    folder(workdir / "imgs")
    params = write_params(
        prepare={"dataset": "imgs", "labeled": 24, "unlabeled": 12, "test": None, "channels": channels},
        teacher={"arch": "cnn", "arch_kwargs": {"widths": [4], "hidden": 8}, "epochs": 1, "batch_size": 8},
        label={"top_k": 2, "temperatures": [1, 4]},
        students={"rgb": {"arch": f"{zoo}:torchvision_rgb", "epochs": 1, "batch_size": 8,
                          "loss": {"soft": {"weight": 0.9, "temperature": 4}, "hard": {"weight": 0.1}}}})
    ok(invoke(prepare.main, "--params", params))
    ok(invoke(teacher.main, "--params", params, "--no-progress"))
    ok(invoke(label.main, "--params", params, "--no-progress"))
    if channels == 3:
        ok(invoke(distill.main, "rgb", "--params", params, "--no-progress"))
        assert read_json(workdir / "data" / "students" / "rgb" / "config.json")["input_shape"] == [3, 8, 8]
        return
    result = invoke(distill.main, "rgb", "--params", params, "--no-progress", expect=1)
    (line,) = result.stderr.strip().splitlines()
    assert f"arch '{zoo}:torchvision_rgb': cannot take the data's inputs of shape [1, 8, 8]" in line
    assert "set prepare.channels to the channels its first layer wants" in line
    assert not (workdir / "data" / "students" / "rgb").exists()


@pytest.mark.unit
def test_channel_conversion_matches_pillow():
    from kd.prepared.images import Split
    from kd.sources.images import with_channels

    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    split = Split(np.arange(1), rgb.transpose(2, 0, 1).reshape(1, -1), np.zeros(1, np.int64), [3, 5, 4], 2)
    gray = with_channels(split, 1, "test")
    assert gray.input_shape == [1, 5, 4]
    np.testing.assert_array_equal(gray.x.reshape(5, 4), np.asarray(Image.fromarray(rgb).convert("L")))
    back = with_channels(gray, 3, "test")
    np.testing.assert_array_equal(back.x.reshape(3, 5, 4), np.stack([gray.x.reshape(5, 4)] * 3))
    with pytest.raises(ConfigError, match=r"prepare.channels: 3 for test, whose inputs have shape \[40\]"):
        with_channels(Split(np.arange(1), np.zeros((1, 40), np.float32), np.zeros(1, np.int64), [40], 2), 3, "test")


@pytest.mark.integration
def test_teacher_brought_without_params_gets_them_measured(zoo, workdir, write_params):
    folder(workdir / "imgs")
    params = write_params(prepare={"dataset": "imgs", "labeled": 24, "unlabeled": 12, "test": None},
                          label={"top_k": 2})
    ok(invoke(prepare.main, "--params", params))
    torch.manual_seed(0)
    net = image_models.build(f"{zoo}:kd_style", {}, [1, 8, 8], 3)
    image_models.save_model(workdir / "mine", net,
                            {"arch": f"{zoo}:kd_style", "input_shape": [1, 8, 8], "num_classes": 3})
    config = read_json(workdir / "mine" / "config.json")
    del config["params"]
    (workdir / "mine" / "config.json").write_text(json.dumps(config))
    ok(invoke(label.main, "--params", params, "--teacher", "mine", "--arch", f"{zoo}:kd_style", "--no-progress"))
    manifest = read_json(workdir / "data" / "teacher_outputs" / "manifest.json")
    assert manifest["teacher"]["config"]["params"] == count_params(net)


@pytest.mark.integration
def test_an_arch_named_on_the_command_line_does_not_take_kwargs_of_another(zoo, workdir, write_params):
    folder(workdir / "imgs")
    params = write_params(prepare={"dataset": "imgs", "labeled": 24, "unlabeled": 12, "test": None},
                          teacher={"arch": "cnn", "arch_kwargs": {"widths": [4], "hidden": 8}, "epochs": 1},
                          label={"arch": f"{zoo}:timm_style", "arch_kwargs": {"style": "dict"}, "top_k": 2})
    ok(invoke(prepare.main, "--params", params))
    ok(invoke(teacher.main, "--params", params, "--arch", f"{zoo}:kd_style", "--no-progress"))
    assert read_json(workdir / "data" / "teacher" / "config.json")["arch_kwargs"] == {}
    # label: --arch other than label.arch -> the teacher's own config.json kwargs ({}), not label.arch_kwargs
    ok(invoke(label.main, "--params", params, "--arch", f"{zoo}:kd_style", "--no-progress"))
    ok(invoke(teacher.main, "--params", params, "--arch", "cnn", "--no-progress"))  # the same arch: its kwargs
    assert read_json(workdir / "data" / "teacher" / "config.json")["arch_kwargs"] == {"widths": [4], "hidden": 8}


# --- a Hugging Face image classifier as the teacher --------------------------------------------


def tiny_vit(directory: Path, size: int = 8, channels: int = 1, classes: int = 3) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=4, num_channels=channels, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=classes)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.integration
def test_hugging_face_image_classifier_as_the_teacher(workdir, write_params):
    folder(workdir / "imgs")
    vit = tiny_vit(workdir / "vit")
    assert (workdir / "vit" / "model.safetensors").is_file()
    params = write_params(
        prepare={"dataset": "imgs", "labeled": 24, "unlabeled": 12, "test": None},
        label={"top_k": 3, "temperatures": [1, 4], "features": {"vit.layers.0": "full"}},
        students={"cnn": {"arch": "cnn", "arch_kwargs": {"widths": [4], "hidden": 8}, "epochs": 1, "batch_size": 8,
                          "loss": {"soft": {"weight": 1.0, "temperature": 4}}}},
        eval={"latency_runs": 2, "throughput_runs": 1, "throughput_batch": 8},
    )
    ok(invoke(prepare.main, "--params", params))
    ok(invoke(label.main, "--params", params, "--teacher", "vit", "--no-progress"))
    manifest = read_json(workdir / "data" / "teacher_outputs" / "manifest.json")
    teacher_config = manifest["teacher"]["config"]
    assert teacher_config["arch"] == "hf_image" and teacher_config["params"] == count_params(vit)
    assert manifest["num_classes"] == 3 and manifest["features"][0]["shape"] == [5, 16]  # 4 patches + CLS

    # the cached logits are the ViT's own on the normalised inputs
    from kd.cache import Cache
    from kd.prepared import images

    test = images.read_split(workdir / "data" / "prepared" / "test.parquet")
    with torch.no_grad():
        expected = vit(pixel_values=torch.tensor(test.x).reshape(-1, 1, 8, 8)).logits
    soft = Cache.open(workdir / "data" / "teacher_outputs").soft_targets("test", [1])
    assert np.array_equal(soft.topk_idx[:, 0], expected.argmax(1).numpy())
    rows = pq.read_table(workdir / "data" / "teacher_outputs" / "soft_targets" / "split=test")
    np.testing.assert_allclose(rows.column("logit_max").to_numpy(), expected.max(1).values.numpy(), rtol=1e-5,
                               atol=1e-5)

    ok(invoke(distill.main, "cnn", "--params", params, "--no-progress"))
    ok(invoke(eval_stage.main, "cnn", "--params", params))
    metrics = read_json(workdir / "data" / "students" / "cnn" / "metrics.json")
    assert metrics["teacher_params"] == count_params(vit)
    assert metrics["speedup_vs_teacher"] is not None and metrics["teacher_throughput_source"] == "measured"


@pytest.mark.integration
def test_hugging_face_teacher_of_another_image_size_is_refused(workdir, write_params):
    folder(workdir / "imgs", size=(6, 6))
    tiny_vit(workdir / "vit", size=8)
    params = write_params(prepare={"dataset": "imgs", "labeled": 24, "unlabeled": 12, "test": None}, label={"top_k": 2})
    ok(invoke(prepare.main, "--params", params))
    result = invoke(label.main, "--params", params, "--teacher", "vit", "--no-progress", expect=1)
    assert "vit: the teacher takes 1x8x8 images (its config.json), the data gives 1x6x6" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.unit
def test_hf_image_students_and_twins_build_from_config_fields():
    torch.manual_seed(0)
    model = image_models.build("hf_image", {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 16, "patch_size": 2},
                         [3, 4, 4], 5)
    assert model.config.num_channels == 3 and model.config.image_size == 4 and model.config.num_labels == 5
    assert model(torch.zeros(2, 3, 4, 4)).shape == (2, 5)
    with pytest.raises(ConfigError, match="arch hf_image: model_type 'nope'"):
        image_models.build("hf_image", {"model_type": "nope"}, [3, 4, 4], 5)
