"""ONNX export of a folded student, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from gpd_fx.checkpoint import atomic_write
from gpd_fx.errors import GPDError

__all__ = ["ExportError", "export_onnx", "onnx_available"]


class ExportError(GPDError, RuntimeError):
    """ONNX export failed, or onnxruntime disagrees with PyTorch beyond the tolerance."""


def onnx_available() -> bool:
    """Whether ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``gpd_fx[onnx]`` extra) import.

    Returns:
        ``True`` when all three are installed.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _output_tensors(out) -> list[Tensor]:
    """The tensors of a (nested: tuple, dict, ``ModelOutput``) output in the order the ONNX
    exporter flattens them (pytree leaf order)."""
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike, *, atol: float = 1e-4,
                rtol: float = 1e-5, dynamic_batch: bool = True) -> float:
    """Export ``model`` to ONNX with the dynamo exporter and verify it with onnxruntime.

    The file is written atomically, and only after onnxruntime reproduced the PyTorch
    output on ``example`` within ``atol + rtol * max|output|``, so a wrong model never lands
    at ``path``.

    Args:
        model: an exportable module (e.g. the output of :func:`gpd_fx.fold`); it is put in
            eval mode and moved to the CPU.
        example: one input batch (floating inputs are exported in float32; token ids stay
            integers). Outputs may be nested (tuples, dicts, ``ModelOutput``): every tensor in
            them is compared.
        path: destination ``.onnx`` file.
        atol: absolute part of the accepted difference between onnxruntime and PyTorch.
        rtol: part relative to the largest output magnitude. Float32 kernels that sum in
            another order differ by about 1e-7 of the magnitude per layer; an untrained or
            briefly trained network can have logits of 1e4 or more, so a purely absolute
            bound would fail on rounding alone. 1e-4 + 1e-5 * max stays far below any real
            export bug (a wrong op changes outputs by O(1) of their magnitude).
        dynamic_batch: export the batch dimension as dynamic.

    Returns:
        The largest absolute difference between onnxruntime's and PyTorch's outputs.

    Raises:
        ExportError: the exporter failed, or the outputs differ by more than ``atol``.

    Example:
        >>> from gpd_fx.models import small_cnn
        >>> export_onnx(small_cnn(), torch.randn(2, 3, 16, 16), "/tmp/s.onnx") < 1e-4  # doctest: +SKIP
        True
    """
    if not onnx_available():
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'gpd_fx[onnx]'")
    import onnxruntime as ort

    model = model.eval().cpu()
    example = example.detach().cpu()
    if example.is_floating_point():
        example = example.float()   # token ids stay integers
    with torch.no_grad():
        expected = _output_tensors(model(example))
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        # the exporter prints progress and emits deprecation warnings we cannot act on
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            names = ["logits"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=["input"], output_names=names, verbose=False)
            data = program.model_proto.SerializeToString()
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {first}") from None
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    if len(got) != len(expected):
        raise ExportError(f"the ONNX model gives {len(got)} outputs, PyTorch {len(expected)}; the ONNX file "
                          "was not written")
    diff = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
    bound = atol + rtol * max(float(e.abs().max()) for e in expected)
    if not diff <= bound:
        raise ExportError(f"onnxruntime output differs from PyTorch by {diff:.3g} > {bound:.3g} "
                          f"(atol={atol} + rtol={rtol} * max|output|); the ONNX file was not written")
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
    return diff
