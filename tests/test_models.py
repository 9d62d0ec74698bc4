"""The model zoo: every architecture of the report, by name, with its options."""

import os

import pytest
import torch
import torchvision

from mtl.config import ModelConfig
from mtl.data.miniscapes import NUM_CLASSES
from mtl.losses import DepthCodec, multitask_loss
from mtl.models import ARCHITECTURES, build_model, resolve
from mtl.models.summary import REPORT, count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEP_SUPERVISION = {"distillation": 2}


@pytest.mark.parametrize("arch", ARCHITECTURES.names)
def test_parameter_counts_match_the_report(arch):
    n = count_params(build_model(ModelConfig(arch=arch, encoder="resnet34")))
    assert abs(n - REPORT[arch]["params"]) <= 0.03 * REPORT[arch]["params"], n


@pytest.mark.parametrize("arch", ARCHITECTURES.names)
def test_forward_odd_size_full_resolution(arch):
    model = build_model(ModelConfig(arch=arch, encoder="resnet18")).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 250, 500))
    assert len(out["semseg"]) == len(out["depth"]) == DEEP_SUPERVISION.get(arch, 1)
    for y in out["semseg"]:
        assert y.shape == (1, NUM_CLASSES, 250, 500)
    for y in out["depth"]:
        assert y.shape == (1, 1, 250, 500)


@pytest.mark.parametrize("arch", ARCHITECTURES.names)
def test_backward_channels_last_bf16(arch):
    model = build_model(ModelConfig(arch=arch, encoder="resnet18")).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 65, 97).contiguous(memory_format=torch.channels_last)  # (odd sizes, small: bf16 is slow on a CPU)
    batch = {"semseg": torch.randint(0, NUM_CLASSES, (2, 65, 97)), "depth": torch.rand(2, 65, 97) * 50 + 4,
             "valid": torch.ones(2, 65, 97, dtype=torch.bool)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["semseg"][-1].shape == (2, NUM_CLASSES, 65, 97)
    loss, _ = multitask_loss(out, batch, DepthCodec("log"), 0.5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["branched", "branched_vortex"])
def test_every_conv_sees_channels_last_input(arch):
    """A conv fed NCHW in a channels_last model costs a layout copy (and slower kernels) on a
    GPU; the image-pooling branch once turned the context modules' concat into NCHW."""
    model = build_model(ModelConfig(arch=arch, encoder="resnet18")).to(memory_format=torch.channels_last)
    nchw = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, inp, name=name: None if inp[0].is_contiguous(
                memory_format=torch.channels_last) else nchw.append(name))
    model(torch.randn(2, 3, 64, 128).contiguous(memory_format=torch.channels_last))
    assert nchw == []


@pytest.mark.parametrize("arch", ARCHITECTURES.names)
def test_overfits_a_tiny_batch(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder="resnet18"))
    x = torch.randn(2, 3, 64, 64)
    yy = torch.arange(64).view(1, 64, 1).expand(2, 64, 64)
    batch = {"semseg": (yy // 16 + torch.arange(2).view(2, 1, 1) * 4).long(),  # bands of 4+ classes
             "depth": (yy.float() + 5.0), "valid": torch.ones(2, 64, 64, dtype=torch.bool)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    codec = DepthCodec("log")
    losses, parts = [], []
    for _ in range(40):  # (it gets there in 7-9 steps; the rest would only cost time)
        loss, part = multitask_loss(model(x), batch, codec, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        parts.append({k: float(v) for k, v in part.items()})
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert all(parts[-1][k] < parts[0][k] / 2 for k in parts[0]), (parts[0], parts[-1])  # both tasks learn


def test_architecture_defaults_and_options():
    v = resolve(ModelConfig(arch="branched_vortex"))
    assert (v.output_stride, v.aspp_rates, v.semseg_context, v.semseg_decoder, v.depth_context) == (8, (12, 24, 36), "vortex", "double_skip", "aspp")
    assert resolve(ModelConfig(arch="branched")).aspp_rates == (6, 12, 18)
    assert resolve(ModelConfig(arch="branched", output_stride=8)).aspp_rates == (12, 24, 36)
    assert resolve(ModelConfig(arch="branched", output_stride=32)).aspp_rates == (3, 6, 9)  # (scaled with the feature map)
    m = build_model(ModelConfig(arch="branched", encoder="resnet50", output_stride=32, aspp_rates=(3, 6), depth_context="none"))
    assert m.encoder.output_stride == 32 and len(m.branches["semseg"].context.branches) == 3
    with torch.no_grad():
        feats = m.encoder(torch.zeros(1, 3, 64, 64))
    assert feats["out"].shape[-1] == 2 and feats["4x"].shape[1] == 256
    with pytest.raises(ValueError, match="--encoder must be one of resnet18, resnet34, resnet50; got 'vgg'"):
        build_model(ModelConfig(encoder="vgg"))
    with pytest.raises(ValueError, match="--output-stride must be one of 8, 16, 32; got 4"):
        build_model(ModelConfig(output_stride=4))


def test_distillation_sums_features_of_decoders_at_other_strides():
    """A double-skip decoder's features are at stride 2, a skip's or the placeholder's at 4: the
    gated features are brought to the receiving task's size before the sum."""
    x = torch.randn(1, 3, 64, 96)
    for semseg, depth in (("double_skip", "skip"), ("skip", "double_skip"), ("double_skip", "none")):
        m = build_model(ModelConfig(arch="distillation", encoder="resnet18", semseg_decoder=semseg, depth_decoder=depth)).eval()
        with torch.no_grad():
            out = m(x)
        assert [o.shape[-2:] for t in ("semseg", "depth") for o in out[t]] == [x.shape[-2:]] * 4, (semseg, depth)


def test_the_skeletons_placeholder_decoder_builds_the_reports_early_baselines():
    """§2.2–2.3 of the report (Tables 4–6) trained the skeleton's placeholder decoder: the
    context's features upsampled to stride 4, no skip, a 1x1 conv to the predictions; "without
    ASPP" had a 1x1 ConvBnRelu in its place."""
    from mtl.models.blocks import ConvBnRelu, resize_to

    m = build_model(ModelConfig(arch="deeplabv3p", encoder="resnet18", semseg_context="none", semseg_decoder="none")).eval()
    b = m.branch
    assert count_params(b.decoder) == 0 and b.head.conv.kernel_size == (1, 1) and isinstance(b.context, ConvBnRelu)
    assert count_params(m) == count_params(m.encoder) + count_params(b.context) + (256 * 20 + 20)  # (19 classes + depth)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = m.encoder(x)
        out = m(x)
        expected = resize_to(b.head.conv(resize_to(b.context(feats["out"]), feats["4x"].shape[-2:])), x.shape[-2:])
    assert torch.allclose(out["semseg"][0], expected[:, :NUM_CLASSES]) and torch.allclose(out["depth"][0], expected[:, NUM_CLASSES:])
    branched = build_model(ModelConfig(arch="branched", encoder="resnet18", depth_decoder="none"))
    assert branched.branches["depth"].head.conv.kernel_size == (1, 1) and branched.branches["semseg"].head.conv.kernel_size == (3, 3)


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_dilation_keeps_resolution_and_parameters(os_):
    m = build_model(ModelConfig(arch="deeplabv3p", encoder="resnet34", output_stride=os_))
    with torch.no_grad():
        f = m.encoder(torch.zeros(1, 3, 128, 128))
    assert f["out"].shape[-1] == 128 // os_
    assert count_params(m) == REPORT["deeplabv3p"]["params"]


class SkeletonBlock(torch.nn.Module):
    """The course skeleton's ``BasicBlockWithDilation`` (layers only: the test compares convs):
    the dilation goes to conv2, never to conv1."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
        super().__init__()
        from torchvision.models.resnet import conv3x3

        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride=stride), torch.nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, dilation=dilation), torch.nn.BatchNorm2d(planes)
        self.downsample = downsample


def skeleton_encoder(name, output_stride):
    """The report's encoder as the skeleton built it: torchvision's ResNet with
    ``replace_stride_with_dilation`` (SkeletonBlock for the BasicBlock nets), then each dilated
    stage's first conv2 set to dilation 2."""
    from torchvision.models.resnet import Bottleneck, ResNet

    dilate = {32: [False] * 3, 16: [False, False, True], 8: [False, True, True]}[output_stride]
    block, layers = {"resnet34": (SkeletonBlock, [3, 4, 6, 3]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[name]
    net = ResNet(block, layers, replace_stride_with_dilation=dilate)
    for stage, dilated in zip((net.layer2, net.layer3, net.layer4), dilate):
        if dilated:
            stage[0].conv2.dilation = stage[0].conv2.padding = (2, 2)
    return net


def conv_geometry(stages):
    return [(n, m.stride, m.dilation, m.padding) for stage in stages for n, m in stage.named_modules()
            if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
@pytest.mark.parametrize("os_", [8, 16])
def test_the_encoder_dilates_as_the_course_skeleton_did(name, os_):
    ours = build_model(ModelConfig(arch="deeplabv3p", encoder=name, output_stride=os_)).encoder
    ref = skeleton_encoder(name, os_)
    assert conv_geometry([ours.layer2, ours.layer3, ours.layer4]) == conv_geometry([ref.layer2, ref.layer3, ref.layer4])
    if name == "resnet34":  # a BasicBlock's first 3x3 conv is never dilated; its second is, after the first block
        assert ours.layer4[1].conv1.dilation == (1, 1) and ours.layer4[1].conv2.dilation == ((2, 2) if os_ == 16 else (4, 4))
    # runs trained before that convention keep theirs: every 3x3 conv of a dilated stage at its dilation
    old = build_model(ModelConfig(arch="deeplabv3p", encoder=name, output_stride=os_, dilated_convs="all")).encoder
    d4 = 2 if os_ == 16 else 4
    assert {m.dilation for m in old.layer4.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)} == {(d4, d4)}
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert ours(x)["out"].shape == old(x)["out"].shape


def test_pretrained_weights_from_a_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(ref.conv1.weight, 0.125)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    m = build_model(ModelConfig(encoder="resnet18", pretrained=str(path)))
    assert torch.all(m.encoder.stem[0].weight == 0.125)
    with pytest.raises(ValueError, match=r"r18.pth do not fit this encoder"):
        build_model(ModelConfig(encoder="resnet34", pretrained=str(path)))
    with pytest.raises(FileNotFoundError, match="pretrained encoder weights not found: .*nope.pth"):
        build_model(ModelConfig(encoder="resnet18", pretrained=str(tmp_path / "nope.pth")))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: cannot be read"):
        build_model(ModelConfig(encoder="resnet18", pretrained=str(tmp_path / "junk.pth")))


def test_pretrained_imagenet_comes_from_torchvisions_cache(tmp_path, monkeypatch):
    """--pretrained imagenet reads torchvision's default ImageNet weights where torch hub's cache
    keeps them (placed there by hand: no network here) and says what it loaded; a broken file
    there is an error naming it; no file and no network, an error that says what to do."""
    import torch.hub

    from mtl.models.encoders import describe_pretrained, imagenet_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = imagenet_cache_path("resnet18")
    assert path == str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")  # torchvision's file name
    ref = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(ref.conv1.weight, 0.25)
    os.makedirs(os.path.dirname(path))
    # as torchvision's files: no BatchNorm num_batches_tracked, a classifier the encoder drops
    torch.save({k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    m = build_model(ModelConfig(arch="branched", encoder="resnet18", pretrained="imagenet"))
    assert torch.all(m.encoder.stem[0].weight == 0.25)
    line = describe_pretrained(m)
    assert line.startswith(f"encoder weights from {path}: 100 tensors loaded, the whole encoder"), line
    assert "branches.depth.context" in line and "branches.semseg.head" in line  # ASPP, decoders, heads: from scratch
    assert describe_pretrained(build_model(ModelConfig(arch="branched", encoder="resnet18"))) is None
    with open(path, "wb") as fh:
        fh.write(b"not a state dict")
    with pytest.raises(ValueError, match=f"{path}: cannot be read"):
        build_model(ModelConfig(encoder="resnet18", pretrained="imagenet"))
    os.remove(path)

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=r"not in torch hub's cache .*resnet18-f37072fd.pth.*Network is unreachable.*jobs/pretrained.py"):
        build_model(ModelConfig(encoder="resnet18", pretrained="imagenet"))


def test_pretrained_weights_go_to_a_mirror_in_one_command(tmp_path, monkeypatch):
    """jobs/pretrained.py copies the cached file to a mirror (here a folder; s3:// alike) and
    prints the --pretrained URL, which then loads."""
    from jobs.pretrained import MirrorCommand, main, run
    from mtl.models.encoders import imagenet_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    os.makedirs(os.path.dirname(imagenet_cache_path("resnet18")))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), imagenet_cache_path("resnet18"))
    assert main(["--to", str(tmp_path / "mirror"), "resnet18"]) == 0
    mirrored = tmp_path / "mirror" / "resnet18-f37072fd.pth"
    assert mirrored.read_bytes() == open(imagenet_cache_path("resnet18"), "rb").read()
    build_model(ModelConfig(encoder="resnet18", pretrained=str(mirrored)))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    os.remove(imagenet_cache_path("resnet18"))
    with pytest.raises(FileNotFoundError) as refused:  # (the tool's own error: not "--pretrained", not "run this tool")
        run(MirrorCommand(to=str(tmp_path / "mirror"), encoders=("resnet18",)))
    assert "--pretrained" not in str(refused.value) and "jobs/pretrained.py" not in str(refused.value)
    assert f"Download that URL on a machine with internet, copy the file to {imagenet_cache_path('resnet18')}" in str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES.names)
def test_train_cli_runs_every_architecture(arch, tiny_root, tmp_path, in_process):
    """jobs/train.py's main in this process (a shell's run: tests/test_train_local.py)."""
    from jobs.train import main

    r = in_process(main, ["--local", "--arch", arch, "--encoder", "resnet18", "--root", tiny_root, "--epochs", "1", "--batch-size",
                          "4", "--max-steps-per-epoch", "2", "--workers", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation after epoch 1" in r.stdout and "done: mIoU" in r.stdout
