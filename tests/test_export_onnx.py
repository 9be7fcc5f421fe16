"""slimops.export_onnx: a width of a slimmable model as ONNX, run by onnxruntime.

The deployment contract: what onnxruntime computes from the exported graph equals what the
slimmable model computes at that width (eval mode), at every width of every model.
"""

import io

import pytest
import torch

import slimops
from slimops.export import export_onnx
from slimops.models import MODELS

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

INPUT = (1, 3, 64, 64)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the exporters' own deprecation chatter (torch.export internals), not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _session(data: bytes) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_session(data).run(["output"], {"input": x.numpy()})[0])


def _slim_output(model, w, x):
    with torch.no_grad(), slimops.width(model, w):
        return model(x)


def _tol(expected):
    # folding BN and onnxruntime's own kernels reorder float32 sums
    return dict(rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_width_of_every_model(name):
    from conftest import randomize_bn

    model = randomize_bn(MODELS[name]()).eval()
    for w in slimops.model_widths(model):
        f = io.BytesIO()
        export_onnx(model, w, f, input_size=INPUT)
        data = f.getvalue()
        onnx.checker.check_model(onnx.load_from_string(data))
        # batch 2 at run time: the batch dimension is symbolic
        x = torch.randn(2, *INPUT[1:])
        expected = _slim_output(model, w, x)
        got = _run(data, x)
        torch.testing.assert_close(got, expected, **_tol(expected),
                                   msg=lambda m: f"{name} width {w}: {m}")


def test_graph_holds_only_standard_onnx_ops():
    from conftest import randomize_bn

    model = randomize_bn(MODELS["s_mobilenet_v2"]()).eval()
    f = io.BytesIO()
    plain = export_onnx(model, 0.35, f, input_size=INPUT)
    graph = onnx.load_from_string(f.getvalue()).graph
    domains = {n.domain for n in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    ops = {n.op_type for n in graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # folded by default
    # the exported weights are the active width's: the first conv has 8 output channels
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    weights = {t.name: t for t in graph.initializer}
    stem_channels = plain.stem.conv.out_channels
    assert stem_channels < model.stem.conv.weight.shape[0]
    assert weights[first_conv.input[1]].dims[0] == stem_channels


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("fold_bn", [True, False], ids=["folded", "bn"])
def test_exporters_and_unfolded_bn(fold_bn, dynamo, tmp_path):
    from conftest import randomize_bn

    model = randomize_bn(MODELS["slim_cnn"]()).eval()
    path = tmp_path / "slim_cnn.onnx"
    w = slimops.model_widths(model)[1]
    plain = export_onnx(model, w, path, input_size=INPUT, fold_bn=fold_bn, dynamo=dynamo)
    # (both exporters fold an eval-mode BN into the conv themselves, so the unfolded export
    # need not show a BatchNormalization node; what matters is the function computed)
    x = torch.randn(3, *INPUT[1:])
    expected = _slim_output(model, w, x)
    got = _run(path.read_bytes(), x)
    torch.testing.assert_close(got, expected, **_tol(expected))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, **_tol(expected))


def test_writes_a_file_path(tmp_path):
    model = MODELS["slim_cnn"]().eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, 1.0, str(path), input_size=INPUT)
    assert path.stat().st_size > 0
    onnx.checker.check_model(onnx.load(str(path)))


def test_bad_arguments():
    model = MODELS["slim_cnn"]().eval()
    with pytest.raises(ValueError, match="width"):
        export_onnx(model, 2.0, io.BytesIO(), input_size=INPUT)
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, 1.0, io.BytesIO(), input_size=(1, 0, 8, 8))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_float64_model_exports_in_float64(dynamo, tmp_path):
    """The example input follows the model's dtype (a float32 example failed inside the
    exporter for a float64 model)."""
    model = MODELS["slim_cnn"]().double().eval()
    path = tmp_path / "m64.onnx"
    export_onnx(model, 0.5, path, input_size=INPUT, dynamo=dynamo)
    # ONNX Runtime's CPU provider has no float64 Conv, so the graph is checked, not run.
    graph = onnx.load(str(path)).graph
    double = onnx.TensorProto.DOUBLE
    assert [i.type.tensor_type.elem_type for i in graph.input] == [double]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [double]
