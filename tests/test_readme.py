"""Every command line in the README's ```bash blocks runs as written, on tiny data.

`README_COMMANDS` below knows each such line (continuations joined, the `# comment` cut, words as the shell splits
them; a `|` between two commands is the README's "or": each side is a line of its own) and says how it runs here:
`Skip(reason)`, or `Run(...)` with exactly these changes to the README's words:

- `PLACEHOLDERS` (every line): a word the README uses for "your file" -> the file made here;
- `Run.fill`: the README's `...`, in order -> the arguments it stands for;
- `Run.replace`: this line's values made tiny (word -> word);
- `Run.extra`: flags appended (tiny sizes and iterations; a later `--set` wins over the README's).

The lines run in README order in one temporary directory, so the README's relative paths (`data/...`,
`runs/...`) are made there by the lines before them, as `python -m cascadevision.cli ...` on this tree. The
repository's `configs/` is linked into that directory.

A README line the table does not know fails `test_every_readme_command_is_in_the_table` (quick), and so does an
entry whose line left the README: adding a command to the README means adding one entry here.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from cascadevision.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND_WORDS = ("cascadevision", "make", "torchrun")


@dataclass(frozen=True)
class Run:
    fill: tuple[str, ...] = ()  # what each `...` stands for, in order
    replace: dict[str, str] = field(default_factory=dict)  # this line's words made tiny
    extra: tuple[str, ...] = ()  # appended flags
    expect: tuple[str, ...] = ()  # text its output must hold
    setup: Callable[[Path], None] | None = None  # called with the working directory before the line runs


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class NotYet:
    """A README line whose command is not implemented yet: not run (a warning names it) until the entry
    becomes the `Run` it holds."""
    run: Run
    waiting_for: str


def tiny(*overrides: str) -> tuple[str, ...]:
    return tuple(arg for key in overrides for arg in ("--set", key))


# the arguments a README `...` stands for
TRAIN_ARGS = ("mask_rcnn_r18_fpn --train-ann data/annotations/instances_train.json --train-images data/images/train "
              "--val-ann data/annotations/instances_val.json --val-images data/images/val")
VAL_ANN, VAL_IMAGES = "data/annotations/instances_val.json", "data/images/val"

PLACEHOLDERS = {
    "CKPT": "renamed.pth",  # runs/r18's final.pth with its classes renamed round, box, ... (`renamed_checkpoint`)
    "other.json": VAL_ANN,  # its categories are circle, rectangle (id 2), ...: named differently from CKPT's
    "FILE": "runs/r18/checkpoints/final.pth",
    "IN": "runs/r18/checkpoints/final.pth",
    "OUT.safetensors": "runs/r18/final.safetensors",
    "some/images/": "data/images/val/",
}

# small enough for seconds per command on a CPU (tests/test_cli.py uses the same)
TINY_DETECTION = ("--no-progress",) + tiny(
    "model.input.scale=[96,96]", "model.backbone.base_channels=8", "model.neck.out_channels=16",
    "model.rpn.feat_channels=16", "model.roi_head.box_head.fc_channels=32",
    "model.roi_head.mask_head.conv_channels=16", "data.batch_size=2", "data.num_workers=0",
    "train.warmup_iters=1", "train.checkpoint_interval=2")
TINY_SEGMENTATION = ("--no-progress",) + tiny(
    "model.input.size=[64,64]", "model.backbone.base_channels=8", "data.batch_size=2", "data.num_workers=0",
    "train.warmup_iters=1", "train.checkpoint_interval=2", "train.max_iters=2")
TINY_EXITS = tiny("data.image_size=8", "model.base_width=4", "train.epochs=1", "train.gate_epochs=5",
                  "train.shift=0")


def renamed_checkpoint(workdir: Path) -> None:
    """CKPT: runs/r18's model with its first two classes renamed `round` and `box` (as if trained on another
    annotation file), so `--class-map "round=circle,box=2"` has something to map."""
    state = torch.load(workdir / "runs/r18/checkpoints/final.pth", map_location="cpu", weights_only=True)
    names = ["round", "box", *state["meta"]["class_names"][2:]]
    state["meta"]["class_names"] = names
    state["meta"]["config"]["model"]["class_names"] = names
    torch.save(state, workdir / PLACEHOLDERS["CKPT"])


# README line -> how it runs here (in README order)
README_COMMANDS = {
    "make demo": Skip("trains two models for about 7.5 minutes; a tiny `cascadevision demo` is in tests/test_cli.py"),
    "make test": Skip("runs this test suite"),
    "cascadevision synth data --num-images 200 --size 256":
        Run(replace={"200": "8", "256": "96"}),
    "cascadevision train mask_rcnn_r18_fpn --train-ann data/annotations/instances_train.json --train-images "
    "data/images/train --val-ann data/annotations/instances_val.json --val-images data/images/val --out runs/r18 "
    "--set train.max_iters=500 --set data.batch_size=4":
        Run(extra=TINY_DETECTION + tiny("train.max_iters=2")),
    "cascadevision train ... --out runs/r18 --resume":
        Run(fill=(TRAIN_ARGS,), extra=TINY_DETECTION + tiny("train.max_iters=3")),
    "torchrun --nproc_per_node 2 -m cascadevision.cli train ...":
        Skip("two processes under torchrun; DDP is tests/test_engine.py's"),
    "cascadevision train ... --out runs/r18 --overwrite":
        Run(fill=(TRAIN_ARGS,), extra=TINY_DETECTION + tiny("train.max_iters=2"), expect=("--overwrite: removed",)),
    "cascadevision eval runs/r18/checkpoints/final.pth --ann ... --images ... --out runs/r18/eval":
        Run(fill=(VAL_ANN, VAL_IMAGES), extra=("--no-progress",), expect=("bbox",)),
    "cascadevision eval CKPT --ann other.json --images ... --class-map round=circle,box=2":
        Run(fill=(VAL_IMAGES,), extra=("--no-progress",), setup=renamed_checkpoint),
    "cascadevision predict runs/r18/checkpoints/final.pth some/images/ --out preds":
        Run(extra=("--no-progress",), expect=("results.json",)),
    "cascadevision check-data data/annotations/instances_train.json data/images/train":
        Run(expect=("no problems found",)),
    "cascadevision presets": Run(expect=("htc_r50_fpn_1x",)),
    "cascadevision config demo_htc_r18 --set train.max_iters=100": Run(expect=("max_iters: 100",)),
    "cascadevision train configs/demo_htc_r18.yaml --train-ann data/annotations/instances_train.json "
    "--train-images data/images/train --train-semantic data/semantic/train --out runs/demo":
        Run(extra=TINY_DETECTION + tiny("train.max_iters=2")),
    "cascadevision predict htc_r50_fpn_1x --weights https://download.openmmlab.com/mmdetection/v2.0/htc/"
    "htc_r50_fpn_1x_coco/htc_r50_fpn_1x_coco_20200317-7332cf16.pth some/images/ --out preds-coco":
        Skip("downloads MMDetection's 300 MB weights; tests/test_pretrained_cli.py runs this path on file:// "
             "URLs and an unreachable URL"),
    "cascadevision serve runs/r18/checkpoints/final.pth":
        Skip("serves until stopped; tests/test_serve.py starts it on a free port and sends it requests"),
    "curl -F image=@photo.jpg http://127.0.0.1:8000/predict?score_thr=0.5":
        Skip("a request to the running server; tests/test_serve.py sends these with httpx"),
    "cascadevision export runs/r18/checkpoints/final.pth --format onnx --out r18.onnx":
        Skip("an ONNX export takes minutes on a shared CPU; tests/test_export.py runs `export` on a tiny checkpoint"),
    "cascadevision predict --onnx r18.onnx some/images/ --out preds-onnx --threads 2":
        Skip("needs the export above; tests/test_export.py runs `predict --onnx` against the checkpoint's outputs"),
    "cascadevision predict runs/r18/checkpoints/final.pth some/images/ --out preds --compile":
        Skip("inductor compiles for minutes on a shared CPU; tests/test_compile.py compiles a tiny model"),
    "cascadevision weights inspect FILE": Run(),
    "cascadevision weights convert IN OUT.safetensors": Run(expect=("tensors to",)),
    "cascadevision exits calibrate-detector runs/demo/checkpoints/final.pth --ann ... --images ... --max-ap-drop 0.5 "
    "--out exit.yaml": Run(fill=(VAL_ANN, VAL_IMAGES), expect=("planned RoI-head compute", "wrote exit.yaml")),
    "cascadevision eval runs/demo/checkpoints/final.pth --ann ... --images ... --exit-config exit.yaml":
        Run(fill=(VAL_ANN, VAL_IMAGES), extra=("--no-progress",), expect=("planned (calibration split)",)),
    "cascadevision exits train --preset mobile": Run(extra=TINY_EXITS, expect=("wrote runs/exits-mobile/model.pth",)),
    "cascadevision exits calibrate runs/exits-mobile --max-drop 0.5":
        Run(expect=("wrote runs/exits-mobile/thresholds.json",)),
    "cascadevision exits evaluate runs/exits-mobile":
        Run(expect=("thresholds: runs/exits-mobile/thresholds.json", "compact == simulate: True")),
    "cascadevision exits bench runs/exits-mobile": Run(extra=("--repeats", "1"), expect=("| 256 | compact |",)),
    "cascadevision segment train cascade_r18 --train-images data/images/train --train-labels data/semantic/train "
    "--out runs/seg":
        Run(extra=TINY_SEGMENTATION),
    "cascadevision segment eval runs/seg/checkpoints/final.pth --images data/images/val --labels data/semantic/val":
        Run(extra=("--no-progress",), expect=("| mean",)),
}


# ----------------------------------------------------------------------------------------------------------


def readme_command_lines(text: str) -> list[str]:
    """The command lines of the ```bash blocks, in order: continuations joined, comments cut, words as the shell
    splits them (joined by one space), and `a | b` taken as two lines."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("|") if "|" in words else len(words)
                lines.append(" ".join(words[:cut]))
                words = words[cut + 1:]
    return lines


def adapted(line: str, entry: Run) -> list[str]:
    """The words that run for a README line: its own, with the placeholders, `...` and tiny values replaced."""
    fills = iter(entry.fill)
    words = []
    for word in line.split(" "):
        if word == "...":
            fill = next(fills, None)
            assert fill is not None, f"README line has more `...` than its entry fills: {line}"
            words += fill.split(" ")
        else:
            words.append(entry.replace.get(word, PLACEHOLDERS.get(word, word)))
    assert next(fills, None) is None, f"entry fills more `...` than the README line has: {line}"
    return words + list(entry.extra)


def test_every_readme_command_is_in_the_table():
    lines = readme_command_lines(README.read_text())
    assert lines, "no command lines found in README.md's ```bash blocks"
    unknown = [line for line in lines if line not in README_COMMANDS]
    assert not unknown, "README command lines that tests/test_readme.py does not know (add one entry each):\n" + \
        "\n".join(unknown)
    stale = [line for line in README_COMMANDS if line not in lines]
    assert not stale, "entries of tests/test_readme.py whose line is no longer in the README:\n" + "\n".join(stale)


def test_every_readme_command_parses():
    """Flags the CLI does not know (or a required one the README leaves out) fail here, without running."""
    parser = build_parser()
    for line, entry in README_COMMANDS.items():
        if isinstance(entry, NotYet):
            continue
        if isinstance(entry, Run) and line.startswith("cascadevision "):
            try:
                parser.parse_args(adapted(line, entry)[1:])
            except SystemExit:
                pytest.fail(f"the CLI does not accept the README line: {line}")


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    if (REPO / "configs").is_dir():
        (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    for line in readme_command_lines(README.read_text()):
        entry = README_COMMANDS[line]
        if isinstance(entry, NotYet):
            warnings.warn(f"README line not run yet ({entry.waiting_for}): {line}")
        if not isinstance(entry, Run):
            continue
        if entry.setup:
            entry.setup(tmp_path)
        words = adapted(line, entry)
        assert words[0] == "cascadevision", line
        result = subprocess.run([sys.executable, "-m", "cascadevision.cli", *words[1:]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode == 0, (f"README line failed (exit status {result.returncode}):\n  {line}\n"
                                        f"ran as:\n  {shlex.join(words)}\n{output[-3000:]}")
        missing = [text for text in entry.expect if text not in output]
        assert not missing, f"README line {line!r}: output lacks {missing}:\n{output[-3000:]}"
