"""The command line explains itself: examples, a help line for every flag, defaults shown, presets described,
and a quick start (no torch) for --help and the commands that do not need it."""
import argparse
import subprocess
import sys
from pathlib import Path

from cascadevision.cli import build_parser, main
from cascadevision.config import PREDICT_SCORE_THR
from cascadevision.models.build import build_model
from cascadevision.presets import describe_preset

REPO = Path(__file__).parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_top_level_help_has_examples(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    for command in ("cascadevision train demo_htc_r18", "cascadevision eval", "cascadevision predict",
                    "cascadevision config", "cascadevision presets"):
        assert command in out, command


def test_every_flag_of_the_main_commands_says_what_it_does():
    commands = subcommands(build_parser())
    for name in ("synth", "train", "eval", "predict", "demo", "config", "check-data"):
        for action in commands[name]._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_defaults_are_shown(capsys):
    for argv, shown in ((["eval", "--help"], "(default: auto)"), (["demo", "--help"], "(default: demo_out)"),
                        (["predict", "--help"], f"(default {PREDICT_SCORE_THR})")):
        try:
            main(argv)
        except SystemExit:
            pass
        assert " ".join(capsys.readouterr().out.split()).count(shown) == 1, argv


def test_exits_and_segment_help_lines_are_their_packages_own():
    # `cascadevision --help` lists them without importing their packages: the lines must match the real ones
    full, light = help_lines(build_parser()), help_lines(build_parser("train"))
    assert light == full
    assert "exits" in subcommands(build_parser("exits"))["exits"].format_help()


def test_help_and_light_commands_do_not_import_torch():
    code = ("import sys\nfrom cascadevision.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stderr.strip().endswith("False"), done.stderr[-2000:]


def test_presets_lists_each_with_its_parameter_count_and_what_it_is(capsys):
    assert main(["presets"]) == 0
    presets, recipes = capsys.readouterr().out.split("\n\n")
    rows = {line.split()[0]: line.split() for line in presets.splitlines()[1:]}
    # independent counts: the small presets built for real on the CPU
    for name in ("mask_rcnn_r18_fpn", "htc_r18_fpn"):
        real = sum(p.numel() for p in build_model(name, num_classes=80).parameters())
        assert rows[name][1] == f"{real / 1e6:.1f}M", name
    assert rows["htc_r50_fpn_1x"][1] == rows["htc_r50_fpn_20e"][1]  # one model, two schedules
    assert " ".join(rows["htc_r50_fpn_20e"][2:]).endswith("20 epochs")
    assert "demo_htc_r18" in recipes and "htc_r50_fpn_1x" in recipes  # the recipes are listed too


def test_a_preset_description_is_read_from_its_config():
    assert describe_preset("htc_r50_fpn_20e") == ("HTC + semantic branch, 3 stages; ResNet-50 FPN-256; 1333x800; "
                                                  "20 epochs")
    assert describe_preset("mask_rcnn_r18_fpn") == "Mask R-CNN; ResNet-18 FPN-128; 512x320; 12 epochs"
    assert describe_preset("htc_efficientvit_m0_fpn").startswith("HTC + semantic branch, 3 stages; EfficientViT-M0")
