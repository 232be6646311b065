"""Tensors the library hands to convolutions have the standard strides, even where a size-1 dim makes
`.contiguous()` a no-op (a 1-channel batch permuted from NHWC is 'contiguous' and 'channels-last' at once;
backward through oneDNN on such batches aborted the test suite once, with one thread, torch 2.13 CPU)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from cascadevision.early_exit.config import ExitModelConfig, ExitTrainConfig
from cascadevision.early_exit.models import MultiExitResNet
from cascadevision.early_exit.training import random_shift, train_multi_exit
from cascadevision.ops import standard_strides
from cascadevision.ops.layout import contiguous_strides


def row_major(shape):
    """Strides of a row-major array, by hand: (a, b, c, d) -> (b*c*d, c*d, d, 1), an empty dim counting as 1."""
    return tuple(int(torch.tensor([max(s, 1) for s in shape[i + 1:]], dtype=torch.long).prod())
                 for i in range(len(shape)))


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (2, 3, 5, 7), (1, 1, 1, 1), (3, 0, 2, 2), (5,)])
def test_contiguous_strides_by_hand(shape):
    assert contiguous_strides(shape) == row_major(shape) == torch.empty(shape).stride()


def test_standard_strides_copies_only_odd_strides():
    ambiguous = torch.rand(4, 8, 8, 1).permute(0, 3, 1, 2).contiguous()  # .contiguous() keeps (64, 1, 8, 1)
    assert ambiguous.stride() == (64, 1, 8, 1)
    assert ambiguous.is_contiguous() and ambiguous.is_contiguous(memory_format=torch.channels_last)
    fixed = standard_strides(ambiguous)
    assert fixed.stride() == (64, 64, 8, 1) and torch.equal(fixed, ambiguous)
    plain = torch.rand(2, 3, 4)
    assert standard_strides(plain) is plain
    transposed = plain.transpose(1, 2)
    assert standard_strides(transposed).stride() == (12, 3, 1) and torch.equal(standard_strides(transposed), transposed)


@pytest.mark.parametrize("channels", [1, 3])
def test_random_shift_gives_standard_strides_and_shifted_pixels(channels):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, channels, 8, 8, generator=generator)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(3))
    assert shifted.stride() == row_major((5, channels, 8, 8))
    # each image equals its input moved by one (dy, dx) in [-2, 2], with zeros where it came from outside
    for i in range(5):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros(channels, 8, 8)
                for y in range(8):
                    for x in range(8):
                        if 0 <= y + dy < 8 and 0 <= x + dx < 8:
                            expected[:, y, x] = images[i, :, y + dy, x + dx]
                matches.append(torch.equal(shifted[i], expected))
        assert any(matches)


def test_training_feeds_the_model_standard_strides():
    model = MultiExitResNet(ExitModelConfig(num_stages=2, base_width=4))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape, args[0].stride())))
    images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    train_multi_exit(model, images, labels, ExitTrainConfig(epochs=1, batch_size=16, shift=1), [0.5, 1.0], log=None)
    assert seen and all(stride == row_major(tuple(shape)) for shape, stride in seen)


def test_one_thread_training_on_one_channel_batches_runs_to_the_end():
    """The reported abort, run where it cannot take pytest down: one thread, shifted 1-channel digits."""
    script = textwrap.dedent("""
        import torch
        from cascadevision.early_exit.config import ExitModelConfig, ExitTrainConfig
        from cascadevision.early_exit.models import MultiExitResNet
        from cascadevision.early_exit.training import train_multi_exit

        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(0)
        images, labels = torch.rand(300, 1, 8, 8, generator=generator), torch.arange(300) % 10
        for loss, gating in [("fixed", "hard"), ("sdn", "none"), ("subsets", "none")]:
            torch.manual_seed(0)
            model = MultiExitResNet(ExitModelConfig(num_stages=3, base_width=4))
            cfg = ExitTrainConfig(epochs=2, batch_size=32, loss=loss, gating=gating, shift=1)
            train_multi_exit(model, images, labels, cfg, [0.3, 0.6, 1.0], log=None)
        print("done")
    """)
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                          env={"MALLOC_CHECK_": "3", "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
