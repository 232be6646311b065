"""--compile: the dense parts of a detector compiled once with dynamic shapes, for any image size, and giving the
eager model's detections."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from cascadevision.export.compile import compile_model, compiled_parts
from cascadevision.models import build_model


# Dynamo (graph capture, guards, recompilation) is what the backend-independent checks are about; inductor's
# C++ compilation of the three graphs takes minutes on a busy 2-core machine, so it runs with the slow tests.
@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_two_image_sizes_compile_once_and_match_eager(backend, one_thread):
    torch.manual_seed(0)
    model = build_model("faster_rcnn_r18_fpn", num_classes=3, input={"scale": (128, 96)},
                        roi_head={"test": {"score_thr": 0.05}}).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 100, 150, generator=g), torch.rand(3, 130, 90, generator=g)]  # padded 96x128, 128x96
    with torch.no_grad():
        eager = [model([image])[0] for image in images]
        torch._dynamo.reset()
        counters.clear()
        compile_model(model, backend=backend)
        assert [p._compiled_call_impl is not None for p in compiled_parts(model)] == [True] * 3
        first = model([images[0]])[0]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 3  # backbone, neck, box head: one graph each, no graph break
        second = model([images[1]])[0]
        assert counters["stats"]["unique_graphs"] == graphs  # the second size reuses the graphs: no recompile
    for got, want in zip([first, second], eager):
        assert len(got["scores"]) == len(want["scores"]) > 0
        assert torch.equal(got["labels"], want["labels"])
        assert (got["boxes"] - want["boxes"]).abs().max() < 1e-2
        assert (got["scores"] - want["scores"]).abs().max() < 1e-3


def test_non_detectors_compile_whole():
    layer = torch.nn.Linear(3, 2)
    assert compiled_parts(layer) == [layer]
    compile_model(layer, backend="eager")
    assert layer._compiled_call_impl is not None
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]  # checkpoints keep their keys
