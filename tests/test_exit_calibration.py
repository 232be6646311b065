"""Calibrating a detector's region-level exit (`early_exit/detector_calibration.py`), the honest compute baseline
and the box-only mask path: expectations from hand-built tables, naive loops and the real model's own runs."""
import dataclasses
import itertools

import pytest
import torch

from cascadevision.cli import main
from cascadevision.config import EarlyExitConfig, to_dict
from cascadevision.data.synth import generate_synthetic
from cascadevision.early_exit.detection import StageCounts, exit_policy_for_head, exit_summary, per_roi_macs
from cascadevision.early_exit.detector_calibration import (DetectorReplay, calibrate_detector, grid_settings,
                                                           load_replay, read_exit_config, write_calibration)
from cascadevision.errors import ConfigError
from cascadevision.io.checkpoint import save_checkpoint
from cascadevision.models import build_model
from cascadevision.presets import load_config
from cascadevision.tasks.detection import run_evaluation

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.input.scale=[64,64]", "model.backbone.base_channels=8", "model.neck.out_channels=16",
        "model.rpn.feat_channels=16", "model.rpn.test_post_nms=40", "model.roi_head.box_head.fc_channels=32",
        "model.roi_head.mask_head.conv_channels=16", "model.roi_head.test.score_thr=0.0",
        "model.roi_head.test.max_per_img=30", "model.roi_head.htc.with_semantic=false"]


# ------------------------------------------------------------------------------------ the search, hand-built


class TableReplay:
    """A stand-in for DetectorReplay whose AP and compute come from a hand-made table: a setting's detections
    are just its RoI settings' key; compute = prune cost + mask cost, AP falls as thresholds get aggressive."""
    with_mask = True
    images = [None] * 10
    seconds = 0.0
    max_proposals = 0

    def __init__(self, grid):
        self.grid = grid
        self.plain_macs = 0.0

    @staticmethod
    def key(values):
        return (values["policy"], values["threshold"], values["prune_threshold"], values["background_threshold"])

    @staticmethod
    def box_macs(values):  # falls with pruning, background drop and a confident exit (the lower, the more)
        box = 600 - 1000 * values["prune_threshold"] - (100 if values["background_threshold"] else 0)
        return box - (1000 * (1 - values["threshold"]) if values["policy"] != "none" else 0)

    def replay(self, values):
        return self.key(values), StageCounts(3, rois=[self.box_macs(values), 0, 0])

    def mask_counts(self, dets, threshold):
        return [int(400 - 500 * threshold), 0, 0]

    def compute(self, counts):  # MACs: the box part rides in rois[0], masks cost 1 each
        return counts.rois[0] + counts.masks[0]

    def bbox_ap(self, key):
        policy, threshold, prune, background = key
        return 50 - 10 * prune - (0.2 if background else 0) - (1 - threshold if policy != "none" else 0)

    def segm_ap(self, key, mask_threshold):
        return self.bbox_ap(key) - 5 - 4 * mask_threshold

    def score(self, values):
        from cascadevision.early_exit.detector_calibration import Candidate
        dets, counts = self.replay(values)
        counts = StageCounts(3, counts.rois, masks=self.mask_counts(dets, values["mask_score_threshold"]))
        macs = self.compute(counts)
        return Candidate(values, macs, macs / self.plain_macs if self.plain_macs else 1.0, rois=counts.rois,
                         bbox_ap=self.bbox_ap(dets), segm_ap=self.segm_ap(dets, values["mask_score_threshold"]))


GRID = {"threshold": (None, 0.95, 0.8), "prune_threshold": (0.0, 0.1, 0.2), "background_threshold": (0.0, 0.9),
        "mask_score_threshold": (0.0, 0.1, 0.3)}


def brute_force(goal, value):
    """Every setting scored naively; the cheapest within the AP drop, or the best AP within the budget."""
    table = TableReplay(GRID)
    plain = table.score({"policy": "none", "threshold": 0.9, "prune_threshold": 0.0, "background_threshold": 0.0,
                         "mask_score_threshold": 0.0})
    rows = [table.score(v) for v in grid_settings(GRID)]
    if goal == "drop":
        ok = [r for r in rows if r.segm_ap >= plain.segm_ap - value]
        return min(ok, key=lambda r: r.macs)
    ok = [r for r in rows if r.macs <= value * plain.macs]
    return max(ok, key=lambda r: (r.segm_ap, -r.macs))


@pytest.mark.parametrize("goal,value", [("drop", 0.5), ("drop", 1.0), ("drop", 2.5), ("budget", 0.8),
                                        ("budget", 0.6)])
def test_the_search_picks_what_a_naive_loop_picks(goal, value):
    expected = brute_force(goal, value)
    kwargs = {"max_ap_drop": value} if goal == "drop" else {"budget": value}
    chosen, _ = calibrate_detector(TableReplay(GRID), grid=GRID, top=100, **kwargs)
    assert chosen.met
    assert chosen.planned["roi_head_gmacs"] * 1e9 == pytest.approx(expected.macs)
    assert chosen.planned_ap == pytest.approx(expected.segm_ap)
    assert chosen.metric == "segm" and chosen.plain_ap == pytest.approx(45.0)


def test_a_worked_example():
    # AP drop 1.0 on segm: plain segm AP 45, so 44 is needed. Costs (box part + masks): plain 600 + 400.
    # prune 0.1: -100 MACs, -1 AP -> 44.0, 900 MACs (meets); + background (-0.2 AP) or any max_prob: fails.
    # max_prob 0.8 (-200, -0.2) + background 0.9 (-100, -0.2) + masks only above 0.1 (-50, -0.4): 650, 44.2 meets;
    # with masks above 0.3 instead (-150, -1.2): 43.4 fails; max_prob 0.8 + prune 0.1: 43.8 fails.
    # So: max_prob 0.8 + background 0.9 + mask score 0.1, 650 MACs (65% of 1000), segm AP 44.2.
    chosen, _ = calibrate_detector(TableReplay(GRID), grid=GRID, max_ap_drop=1.0)
    assert chosen.exit == {"policy": "max_prob", "threshold": 0.8, "prune_threshold": 0.0,
                           "background_threshold": 0.9, "mask_score_threshold": 0.1}
    assert chosen.planned_ap == pytest.approx(44.2) and chosen.planned["roi_head_gmacs"] * 1e9 == pytest.approx(650)
    assert chosen.planned["compute_fraction"] == pytest.approx(0.65)


def test_bad_goals_are_one_line_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate_detector(TableReplay(GRID), grid=GRID)
    with pytest.raises(ConfigError, match="budget"):
        calibrate_detector(TableReplay(GRID), grid=GRID, budget=1.5)


# ------------------------------------------------------------------------------------ the honest baseline


def test_saving_is_counted_against_the_plain_model():
    # the early-exit run: 10 RoIs into stage 1, 4 into stage 2, 2 into stage 3; its 3 masks: one from stage 1's
    # head only, two from stages 1..3. The plain model on the same images: 10 RoIs through all 3 stages and 5
    # detections, each given the masks of stages 1..3.
    run = StageCounts(3, rois=[10, 4, 2], masks=[1, 0, 2])
    plain = StageCounts(3, rois=[10, 10, 10], masks=[0, 0, 5])
    box, mask = [100, 100, 100], [10, 10, 10]
    summary = exit_summary(run, box, mask, plain=plain)
    spent = 10 * 100 + 4 * 100 + 2 * 100 + 1 * 10 + 2 * 30  # 1670
    assert summary["roi_head_gmacs"] == pytest.approx(spent / 1e9)
    assert summary["plain_model_gmacs"] == pytest.approx((3000 + 5 * 30) / 1e9)
    assert summary["saved_fraction"] == pytest.approx(1 - 1670 / 3150)
    # the old figure, "the full cascade on the same proposals", gives the exits' 3 detections all 3 mask heads
    assert summary["full_cascade_gmacs"] == pytest.approx((3000 + 3 * 30) / 1e9)
    assert "plain model" in summary["baseline"] and "RoIAlign" in summary["counting"]
    assert summary["saved_vs_full_cascade"] == pytest.approx(1 - 1670 / 3090)
    # without the plain counts: the old keys, the old figure (what `head.exit_summary()` returns)
    old = exit_summary(run, box, mask)
    assert set(old) == {"rois", "exits", "dropped", "masks", "roi_head_gmacs", "full_cascade_gmacs", "saved_fraction"}
    assert old["saved_fraction"] == pytest.approx(1 - 1670 / 3090)


def tiny_model(seed=0, proposals=0, **exit_values):
    torch.manual_seed(seed)
    cfg = load_config("htc_r18_fpn", TINY + ([f"model.rpn.test_post_nms={proposals}"] if proposals else [])).model
    cfg = dataclasses.replace(cfg, num_classes=5, roi_head=dataclasses.replace(
        cfg.roi_head, early_exit=EarlyExitConfig(**exit_values)))
    from cascadevision.early_exit.detection import build_from_config
    model = build_from_config(cfg).eval()
    with torch.no_grad():  # spread the class scores out (initial weights give every class about 1/6)
        for head in model.roi_head.bbox_head:
            head.fc_cls.weight.normal_(0, 0.3)
    return model


def test_macs_per_roi_by_hand():
    head = tiny_model().roi_head
    box, mask = per_roi_macs(head)
    c, fc, k = 16, 32, 5  # channels, fc width, classes
    assert head.cfg.box_head.reg_class_agnostic  # HTC: one box per RoI, 4 deltas
    assert box == [c * 7 * 7 * fc + fc * fc + fc * (k + 1) + fc * 4] * 3
    m = 16  # mask conv channels; 4 3x3 convs at 14x14, a 2x2 stride-2 deconv to 28x28, 1x1 logits at 28x28
    base = 4 * 9 * c * m * 14 * 14 + m * m * 4 * 28 * 28 // 4 + m * k * 28 * 28
    # stages 2 and 3 (info flow) also get the previous stage's feature through a 1x1 conv at 14x14
    assert mask == [base, base + m * m * 14 * 14, base + m * m * 14 * 14]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_synthetic(root, num_images=4, size=64, seed=3, val_fraction=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, split):
    model = tiny_model()
    cfg = load_config("htc_r18_fpn", TINY)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=5))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, {"state_dict": model.state_dict(),
                           "meta": {"config": to_dict(cfg), "class_names": ["circle", "rectangle", "triangle", "ring", "star"]}})
    return path


def test_eval_reports_the_plain_model_on_the_same_images(split, checkpoint):
    exit_values = {"policy": "max_prob", "threshold": 0.9, "prune_threshold": 0.1}
    metrics = run_evaluation(checkpoint, split["val_ann"], split["val_images"], None,
                             overrides={"roi_head": {"early_exit": exit_values}}, progress=False, class_map=None)
    summary = metrics["early_exit"]
    # the plain model, counted by hand: every proposal through every stage, every detection given 3 mask heads
    model = tiny_model()
    box, mask = per_roi_macs(model.roi_head)
    from cascadevision.data import CocoDataset
    dataset = CocoDataset(split["val_ann"], split["val_images"], train=False)
    proposals = detections = 0
    with torch.inference_mode():
        for i in range(len(dataset)):
            image, _ = dataset[i]
            batch, sizes, _, _ = model.transform([image], None)
            proposals += len(model.rpn_head(model.extract_features(batch), sizes)[0][0])
            plain = tiny_model()
            plain.roi_head.exit_policy = None
            detections += len(plain([image])[0]["boxes"])
    assert summary["plain_model_gmacs"] == pytest.approx((proposals * sum(box) + detections * sum(mask)) / 1e9)
    assert summary["rois"][0] == proposals and summary["rois"][2] < proposals  # the exits did something
    assert summary["saved_fraction"] == pytest.approx(1 - summary["roi_head_gmacs"] / summary["plain_model_gmacs"])


# ------------------------------------------------------------------------------------ replay == the real model


SETTINGS = [{"policy": "none", "prune_threshold": 0.0, "background_threshold": 0.0, "mask_score_threshold": 0.0},
            {"policy": "max_prob", "threshold": 0.9, "prune_threshold": 0.1, "background_threshold": 0.0,
             "mask_score_threshold": 0.0},
            {"policy": "none", "prune_threshold": 0.0, "background_threshold": 0.5, "mask_score_threshold": 0.5},
            {"policy": "max_prob", "threshold": 0.95, "prune_threshold": 0.05, "background_threshold": 0.6,
             "mask_score_threshold": 0.3},
            {"policy": "none", "prune_threshold": 0.1, "background_threshold": 0.0, "mask_score_threshold": 0.0,
             "proposals": 15}]  # the best 15 of the RPN's 40 proposals: model.rpn.test_post_nms=15


@pytest.mark.parametrize("values", SETTINGS)
def test_replay_gives_the_real_models_detections_and_counts(split, checkpoint, values):
    replay = load_replay(str(checkpoint), split["val_ann"], split["val_images"], device="cpu")
    dets, counts = replay.replay({"threshold": 0.9, **values})
    replayed = replay.results(dets, values["mask_score_threshold"], segm=True)
    model = tiny_model(**values)
    model.roi_head.exit_policy.reset()
    real = []
    from cascadevision.engine.evaluator import results_to_coco
    with torch.inference_mode():
        for i in range(len(replay.dataset)):
            image, _ = replay.dataset[i]
            out = model([image])
            real += results_to_coco(out, [replay.dataset.image_ids[i]], replay.cat_ids)
    total = model.roi_head.exit_policy.total()
    assert (counts.rois, counts.exits, counts.dropped, counts.masks) == (total.rois, total.exits, total.dropped,
                                                                          total.masks)
    key = lambda r: (r["image_id"], round(r["score"], 5), r["category_id"])
    replayed, real = sorted(replayed, key=key), sorted(real, key=key)
    assert len(replayed) == len(real) > 0
    for a, b in zip(replayed, real):
        assert key(a) == key(b) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        assert a["segmentation"] == b["segmentation"]
    if values["mask_score_threshold"] > 0:  # some detections took the box-only path, some the mask heads
        assert 0 < sum(counts.masks) < len(real)


def test_unreachable_thresholds_are_the_plain_model(split):
    torch.manual_seed(0)
    image = torch.rand(3, 64, 64)
    plain = tiny_model()
    plain.roi_head.exit_policy = None
    # (max_prob 1.0 is not unreachable: float32 softmax saturates to exactly 1 on this model's spread logits)
    never = tiny_model(prune_threshold=1e-9, background_threshold=1.0, mask_score_threshold=1e-9)
    with torch.inference_mode():
        a, b = plain([image])[0], never([image])[0]
    assert len(a["boxes"]) > 0
    for name in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[name], b[name]), name
    assert never.roi_head.exit_policy.counts.rois == [40, 40, 40]  # the cascade ran in full


# ------------------------------------------------------------------------------------ YAML -> eval


def test_calibration_yaml_round_trips_into_eval(split, checkpoint, tmp_path, capsys):
    replay = load_replay(str(checkpoint), split["val_ann"], split["val_images"], device="cpu")
    grid = {"threshold": (None, 0.9), "prune_threshold": (0.0, 0.1), "background_threshold": (0.0, 0.5),
            "mask_score_threshold": (0.0, 0.3), "proposals": (1.0, 0.5)}
    chosen, _ = calibrate_detector(replay, grid=grid, budget=0.7)
    assert chosen.planned["compute_fraction"] <= 0.7
    path = write_calibration(chosen, tmp_path / "exit.yaml", source=split["val_ann"])
    values, plan = read_exit_config(path)
    assert values == chosen.model_overrides and plan["target"] == {"budget": 0.7}
    assert values["roi_head"]["early_exit"] == chosen.exit
    assert main(["eval", str(checkpoint), "--ann", split["val_ann"], "--images", split["val_images"],
                 "--exit-config", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "planned (calibration split)" in out and "the plain model (no early exit) run on the same images" in out
    # on the calibration split itself the replay is exact: realised == planned
    metrics = run_evaluation(checkpoint, split["val_ann"], split["val_images"], None,
                             overrides=values, progress=False)
    assert metrics["segm"]["AP"] == pytest.approx(chosen.planned["segm_ap"])
    assert metrics["early_exit"]["roi_head_gmacs"] / 2 == pytest.approx(chosen.planned["roi_head_gmacs"])


def test_bad_exit_config_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  roi_head:\n    early_exit:\n      prune: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml|prune"):
        read_exit_config(bad)
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="model.roi_head.early_exit"):
        read_exit_config(other)
    with pytest.raises(ConfigError, match="no such file"):
        read_exit_config(tmp_path / "missing.yaml")


_ = (DetectorReplay, exit_policy_for_head, build_model, itertools)


def test_fewer_proposals_from_an_exit_config_are_not_in_the_baseline(split, checkpoint, tmp_path):
    path = tmp_path / "exit.yaml"
    path.write_text("model:\n  roi_head:\n    early_exit:\n      prune_threshold: 0.1\n  rpn:\n    test_post_nms: 15\n")
    assert main(["eval", str(checkpoint), "--ann", split["val_ann"], "--images", split["val_images"],
                 "--exit-config", str(path), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    import json
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["early_exit"]
    # 2 images: the early-exit run gets the best 15 proposals of each, the plain model all 40 (TINY's test_post_nms)
    assert summary["rois"][0] == 30 and summary["plain_rois"] == [80, 80, 80]
