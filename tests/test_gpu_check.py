"""benchmarks/gpu_check.py runs on CPU at its small sizes and prints every row of its table."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_small_prints_the_whole_table_on_cpu(capsys):
    table = load_script().main(["--small", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == table.strip()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[3:]]
    by_what = {}
    for what, dtype, result in rows:
        by_what.setdefault(what, {})[dtype] = result
    inference = [w for w in by_what if "inference" in w]
    assert len(inference) == 2  # batch 1 and 2 (8 on CUDA)
    for what in inference:
        for dtype in ("fp32", "bf16"):
            assert re.fullmatch(r"[\d.]+ img/s", by_what[what][dtype])
        assert by_what[what]["fp16"] == "n/a (CUDA only)"
    training = [w for w in by_what if "train iteration" in w]
    assert len(training) == 2 and any("with_cp" in w for w in training)
    assert all(set(by_what[w]) == {"fp32", "bf16"} for w in training)
    vit = [w for w in by_what if w.startswith("EfficientViT")]
    assert vit and "V100 published: 27,644" in by_what[vit[0]]["bf16"]
    exits = [w for w in by_what if w.startswith("early-exit")]
    counts = [int(c) for c in re.search(r"exits \[([\d, ]+)\]", exits[0]).group(1).split(",")]
    assert sum(counts) == 32 and len(counts) == 4
    assert "faster than the full model" in by_what[exits[0]]["fp32"]
