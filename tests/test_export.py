"""slimops.export: a slimmable model at one width as a plain PyTorch module."""

import pytest
import torch
from torch import nn

import slimops
from slimops.export import ConvBNAct, export, torchscript_widths
from slimops.models import MODELS, slim_cnn
from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d
from slimops.width import ChannelRule, Slimmable

# Small inputs keep every width of every model (ResNet-50 included) fast.
INPUT = (1, 3, 64, 64)
SLIM_TYPES = (Slimmable, SlimConvBNAct, SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm2d)

# One thread: many small ops, where a busy 2-core machine makes OpenMP workers wait.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """Every model of the registry, eval, with random BN state (so folding is exercised);
    built once per module, on demand."""
    from conftest import randomize_bn

    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = randomize_bn(MODELS[name]()).eval()
        return cache[name]

    return get


def _slim_output(model, w, x):
    with torch.no_grad(), slimops.width(model, w):
        return model(x)


def _assert_plain(exported):
    """No slimmable module, every leaf a stock torch.nn layer (or the plain ConvBNAct)."""
    for name, m in exported.named_modules():
        assert not isinstance(m, SLIM_TYPES), f"{name}: {type(m).__name__}"
        if isinstance(m, ConvBNAct):
            assert isinstance(m.conv, nn.Conv2d) and type(m.conv) is nn.Conv2d
            assert m.bn is None or type(m.bn) is nn.BatchNorm2d
        elif not list(m.children()):
            assert type(m).__module__.startswith("torch.nn"), f"{name}: {type(m)}"


@pytest.mark.parametrize("fold_bn", [True, False], ids=["folded", "bn"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_width_of_every_model(name, fold_bn, models, tol):
    model = models(name)
    x = torch.randn(INPUT)
    for w in slimops.model_widths(model):
        exported = export(model, w, fold_bn=fold_bn)
        assert not exported.training
        _assert_plain(exported)
        blocks = [m for m in exported.modules() if isinstance(m, ConvBNAct)]
        assert blocks and all((m.bn is None) == fold_bn for m in blocks)
        expected = _slim_output(model, w, x)
        with torch.no_grad():
            got = exported(x)
        torch.testing.assert_close(got, expected, **tol(torch.float32, expected),
                                   msg=lambda m: f"{name} width {w}: {m}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript, deprecated in 2.13
@pytest.mark.parametrize("name", sorted(MODELS))
def test_traced_graph_has_no_slimops_op(name, models, tol):
    """Trace -> freeze -> optimize_for_inference at the smallest width; nothing of slimops
    in the graph, same outputs."""
    model = models(name)
    w = slimops.model_widths(model)[0]
    x = torch.randn(INPUT)
    expected = _slim_output(model, w, x)
    with torch.no_grad():
        traced = torch.jit.trace(export(model, w, fold_bn=False), x, check_trace=False)
        assert "slimops::" not in str(traced.inlined_graph)
        torch.testing.assert_close(traced(x), expected, **tol(torch.float32, expected))
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        assert "slimops::" not in str(frozen.graph)
        torch.testing.assert_close(frozen(x), expected, **tol(torch.float32, expected))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_the_slimmable_model_does_call_slimops_ops():
    # The check above would pass vacuously if slimops ops never showed up in a trace.
    model = slim_cnn().eval()
    traced = torch.jit.trace(model, torch.randn(1, 3, 16, 16))
    assert "slimops::" in str(traced.inlined_graph)


def test_no_weight_aliasing():
    model = slim_cnn(shared_bn=False).eval()
    x = torch.randn(1, 3, 16, 16)
    exported = export(model, 0.5, fold_bn=False)
    before = exported(x).detach()
    ours = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    theirs = [t for t in list(exported.parameters()) + list(exported.buffers())]
    assert not any(t.untyped_storage().data_ptr() in ours for t in theirs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            if b.is_floating_point():
                b.mul_(3.0)
    torch.testing.assert_close(exported(x).detach(), before, rtol=0, atol=0)


def test_shared_bn_exports_the_prefix(tol, randomize_bn):
    model = randomize_bn(slim_cnn(shared_bn=True)).eval()
    x = torch.randn(2, 3, 16, 16)
    for w in slimops.model_widths(model):
        for fold in (True, False):
            exported = export(model, w, fold_bn=fold)
            expected = _slim_output(model, w, x)
            torch.testing.assert_close(exported(x).detach(), expected,
                                       **tol(torch.float32, expected))
    bn = export(model, 0.25, fold_bn=False).stem.bn
    assert bn.num_features == slimops.channels(32, (0.25,), 8)[0]


class _Layers(nn.Module):
    """Standalone slimmable layers with biases: grouped, depthwise, BN, linear."""

    def __init__(self, widths=(0.5, 1.0)):
        super().__init__()
        self.grouped = SlimmableConv2d([6, 12], [6, 12], 3, padding=1, groups=3, widths=widths)
        self.depthwise = SlimmableConv2d([6, 12], [6, 12], 3, stride=2, padding="valid",
                                         groups=12, widths=widths)
        self.bn = SwitchableBatchNorm2d([6, 12], widths=widths)
        self.fused = SlimConvBNAct([6, 12], [9, 18], 1, groups=3, activation="relu6",
                                   widths=widths)
        self.fc = SlimmableLinear([9, 18], [5, 10], widths=widths)

    def forward(self, x):
        y = self.bn(self.depthwise(self.grouped(x)))
        return self.fc(self.fused(y).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standalone_layers(dtype, tol, randomize_bn):
    model = randomize_bn(_Layers()).to(dtype).eval()
    for w, c in ((0.5, 6), (1.0, 12)):
        x = torch.randn(2, c, 9, 9, dtype=dtype)
        for fold in (True, False):
            exported = export(model, w, fold_bn=fold)
            _assert_plain(exported)
            assert exported.grouped.groups == 3 and exported.grouped.weight.shape == (c, c // 3, 3, 3)
            assert exported.depthwise.groups == c and exported.depthwise.bias.shape == (c,)
            assert exported.fc.weight.dtype == dtype
            expected = _slim_output(model, w, x)
            torch.testing.assert_close(exported(x).detach(), expected, **tol(dtype, expected))


def test_single_layer_and_trainable_export(tol):
    conv = SlimmableConv2d([4, 8], [4, 8], 3, padding=1, widths=(0.5, 1.0))
    exported = export(conv, 0.5)
    assert type(exported) is nn.Conv2d and exported.weight.shape == (4, 4, 3, 3)
    torch.testing.assert_close(exported.weight, conv.weight[:4, :4], rtol=0, atol=0)
    assert exported.weight.requires_grad
    exported(torch.randn(1, 4, 5, 5)).sum().backward()
    assert exported.weight.grad is not None and conv.weight.grad is None


def test_train_mode_model_exports_eval_and_is_left_alone(make_cnn, tol):
    model = make_cnn().train()
    exported = export(model, 0.5)
    assert model.training and not exported.training
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    expected = _slim_output(model, 0.5, x)
    torch.testing.assert_close(exported(x).detach(), expected, **tol(torch.float32, expected))
    assert slimops.get_width(model) == 1.0  # the default width did not change


def test_unknown_width():
    model = slim_cnn()
    with pytest.raises(ValueError, match=r"unknown width 1\.5.*widths \(0\.25, 0\.5, 0\.75, 1\.0\)"):
        export(model, 1.5)
    with pytest.raises(TypeError, match="a width is a number"):
        export(model, "0.5")


def test_no_slimmable_layers():
    with pytest.raises(ValueError, match="Sequential has no slimmable layers"):
        export(nn.Sequential(nn.Conv2d(3, 3, 1)), 1.0)


def test_unknown_slimmable_layer():
    class Odd(Slimmable, nn.Module):
        def __init__(self):
            nn.Module.__init__(self)
            self._init_widths((0.5, 1.0))

    with pytest.raises(TypeError, match="no plain PyTorch equivalent.*Odd"):
        export(nn.Sequential(SlimmableLinear([2, 4], 3, widths=(0.5, 1.0)), Odd()), 0.5)


def test_exported_as_slimops_export():
    assert slimops.export is export and "export" in slimops.__all__


def test_width_between_the_switches(tol, randomize_bn):
    """A model built from channel rules runs between its listed widths; its export there
    needs that width's calibrated BN statistics, and says so when they are missing."""
    from slimops.train import calibrate_bn

    model = randomize_bn(slim_cnn()).eval()
    with pytest.raises(ValueError, match="no running statistics at width 0.6.*calibrate"):
        export(model, 0.6)
    x = torch.randn(4, 3, 16, 16)
    calibrate_bn(model, [x], widths=[0.6], num_batches=1)
    for fold in (True, False):
        exported = export(model, 0.6, fold_bn=fold)
        _assert_plain(exported)
        expected = _slim_output(model, 0.6, x)
        torch.testing.assert_close(exported(x).detach(), expected, **tol(torch.float32, expected))
    assert exported.stem.conv.out_channels == ChannelRule(32, 8)(0.6)


# -- torchscript_widths(..., freeze=True): the frozen deployment of every width --------------

def _frozen_constants(module):
    """The tensor constants of a frozen TorchScript module's graph."""
    return [n.output().toIValue() for n in module.graph.findAllNodes("prim::Constant")
            if n.output().type().kind() == "TensorType"]


@pytest.mark.parametrize("name", ["slim_cnn", "s_mobilenet_v2", "s_resnet50"])
def test_frozen_torchscript_matches_every_width(name, models, tol):
    """Frozen, every width's branch gives the eager model's output (the BN arithmetic is
    folded into constants by the same ops the eager path runs)."""
    model = models(name)
    x = torch.randn(2, 3, 32, 32)
    frozen = torchscript_widths(model, x, freeze=True)
    assert frozen.widths == list(slimops.model_widths(model))
    for w in slimops.model_widths(model):
        with torch.no_grad():
            got = frozen(x, w)
        torch.testing.assert_close(got, _slim_output(model, w, x), **tol(torch.float32, got))
    with pytest.raises(Exception, match="unknown width"):
        frozen(x, 0.3)


def test_frozen_torchscript_keeps_the_slimops_ops_and_shares_the_weights(models):
    """Freezing inlines the weights as constants: they must be the model's own tensors (same
    storage, full size: the ops read their prefixes), never per-width copies; every other
    constant is a BN-sized vector (the folded scale/shift)."""
    model = models("s_mobilenet_v2")
    x = torch.randn(1, 3, 32, 32)
    frozen = torchscript_widths(model, x, [0.35, 1.0], freeze=True)
    graph = str(frozen.graph)
    assert "slimops::conv2d" in graph and "slimops::depthwise_conv2d" in graph
    assert "aten::batch_norm" not in graph and "aten::rsqrt" not in graph  # folded
    weights = {p.data_ptr(): p for p in model.parameters() if p.dim() >= 2}
    constants = _frozen_constants(frozen)
    shared = {t.data_ptr() for t in constants if t.data_ptr() in weights}
    assert shared == set(weights)  # every conv and linear weight, once
    for t in constants:
        if t.data_ptr() in weights:
            assert t.shape == weights[t.data_ptr()].shape  # the full tensor, not a prefix copy
        else:
            assert t.dim() <= 1, f"a {tuple(t.shape)} constant that is not a model weight"


def test_frozen_torchscript_reads_bn_when_frozen(models, tmp_path):
    """The frozen module keeps the BN statistics of the moment it was made (documented);
    the unfrozen one follows later changes. Saved and loaded, it stores the weights once."""
    model = models("slim_cnn")
    x = torch.randn(1, 3, 32, 32)
    w = slimops.model_widths(model)[-1]
    live = torchscript_widths(model, x, [w])
    frozen = torchscript_widths(model, x, [w], freeze=True)
    before = _slim_output(model, w, x)
    sbn = next(m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d))
    with slimops.width(model, w):
        affine, stats = sbn.active_modules()
    bn = stats or affine  # the BN whose statistics width w reads
    saved = bn.running_mean.clone()
    try:
        bn.running_mean.add_(1.0)
        with torch.no_grad():
            assert torch.equal(live(x, w), _slim_output(model, w, x))
            assert torch.equal(frozen(x, w), before)
            assert not torch.equal(before, _slim_output(model, w, x))
    finally:
        bn.running_mean.copy_(saved)
    path = tmp_path / "frozen.pt"
    frozen.save(str(path))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.stat().st_size < 1.5 * params
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, w), before, rtol=0, atol=0)
