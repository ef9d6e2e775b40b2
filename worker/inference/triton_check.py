"""``triage-node triton check``: validate a Triton model repository before serving it.

Checks what Triton and the worker would otherwise find out at the first request
(STYLE.md 7): every ``config.pbtxt`` parses, its ``name`` equals its folder, each version
folder holds the model file, the ONNX graph's inputs and outputs have the names, types
and ranks the config declares, and the model card's served models, input size and feature
sizes agree with the configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from worker.inference.card import ModelCard
from worker.inference.triton_repository import TritonServerError, read_model_config

# Triton config data types that the ONNX graph's element types must match.
_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


@dataclass
class CheckReport:
    models: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _graph_tensors(path: Path) -> dict[str, tuple[str, list[int | str]]]:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    out: dict[str, tuple[str, list[int | str]]] = {}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        out[value.name] = (_ONNX_TO_TRITON.get(tensor.elem_type, str(tensor.elem_type)), dims)
    return out


def _check_model(folder: Path, report: CheckReport) -> dict[str, list[int]]:
    """Check one model folder; return {tensor name: full dims} as Triton will see them."""
    name = folder.name
    try:
        config = read_model_config(folder / "config.pbtxt")
    except (TritonServerError, FileNotFoundError) as exc:
        report.problems.append(f"{name}: config.pbtxt: {exc}")
        return {}
    if config.name and config.name != name:
        report.problems.append(f"{name}: config name {config.name!r} differs from its folder")
    versions = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        report.problems.append(f"{name}: no version folder")
        return {}
    batch = [-1] if config.max_batch_size > 0 else []
    declared = {
        t.name: (model_type_name(t.data_type), batch + list(t.dims))
        for t in [*config.input, *config.output]
    }
    for version in versions:
        model_file = version / (config.default_model_filename or "model.onnx")
        if not model_file.is_file():
            report.problems.append(f"{name}/{version.name}: {model_file.name} missing")
            continue
        graph = _graph_tensors(model_file)
        for tensor, (dtype, dims) in declared.items():
            if tensor not in graph:
                report.problems.append(f"{name}/{version.name}: ONNX graph has no tensor {tensor!r}")
                continue
            g_type, g_dims = graph[tensor]
            if g_type != dtype:
                report.problems.append(f"{name}: {tensor} is {g_type} in ONNX, {dtype} in config")
            if len(g_dims) != len(dims) or any(
                c != -1 and g != -1 and c != g for c, g in zip(dims, g_dims, strict=False)
            ):
                report.problems.append(f"{name}: {tensor} dims {g_dims} in ONNX, {dims} in config")
        extra = set(graph) - set(declared)
        if extra:
            report.problems.append(f"{name}: ONNX tensors not in config: {sorted(extra)}")
    report.models.append(name)
    return {t: dims for t, (_, dims) in declared.items()}


def model_type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def check_repository(repository: Path, card: ModelCard) -> CheckReport:
    report = CheckReport()
    if not repository.is_dir():
        report.problems.append(f"{repository}: not a folder")
        return report
    shapes = {
        folder.name: _check_model(folder, report)
        for folder in sorted(repository.iterdir())
        if folder.is_dir()
    }
    s, q = card.slice_model, card.sequence_model
    for served in (s, q):
        if served.name not in shapes:
            report.problems.append(f"model card names {served.name!r}, not in the repository")
    if s.name in shapes and shapes[s.name]:
        dims = shapes[s.name]
        expected = {
            s.input: [-1, 3, card.input_size, card.input_size],
            "embedding": [-1, card.embedding_dim],
            "features": [-1, card.feature_channels, card.feature_map_size, card.feature_map_size],
        }
        for tensor, want in expected.items():
            if dims.get(tensor) != want:
                report.problems.append(
                    f"{s.name}: {tensor} is {dims.get(tensor)} in config, card says {want}"
                )
    if q.name in shapes and shapes[q.name]:
        want = [-1, -1, card.embedding_dim + len(card.classes)]
        if shapes[q.name].get(q.input) != want:
            report.problems.append(
                f"{q.name}: {q.input} is {shapes[q.name].get(q.input)} in config, card says {want}"
            )
    return report
