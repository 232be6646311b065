"""The RoI head's config sections, and the old flat spellings: still read everywhere, with a DeprecationWarning
when a person wrote them (YAML, --set, build_model overrides) and silently from a checkpoint's stored config."""
import dataclasses
import warnings

import pytest
import torch

from cascadevision.config import ModelConfig, model_config_from_dict, to_dict, update
from cascadevision.early_exit import exits_config
from cascadevision.early_exit.config import ExitsConfig
from cascadevision.errors import ConfigError
from cascadevision.io.checkpoint import save_checkpoint
from cascadevision.models import build_model
from cascadevision.presets import load_config
from cascadevision.tasks.detection import load_model

# `to_dict(ModelConfig().roi_head)` before the sections, written out by hand: what old checkpoints store
OLD_ROI_HEAD = {
    "type": "standard", "num_stages": 1, "iou_thresholds": [0.5], "stage_loss_weights": [1.0],
    "bbox_stds": [[0.1, 0.1, 0.2, 0.2]], "reg_class_agnostic": False, "match_low_quality": True,
    "num_samples": 512, "pos_fraction": 0.25, "add_gt_as_proposals": True, "finest_scale": 56, "roi_size": 7,
    "num_fcs": 2, "fc_channels": 1024, "loss_bbox": "l1", "smooth_l1_beta": 1.0, "with_mask": True,
    "mask_roi_size": 14, "mask_num_convs": 4, "mask_conv_channels": 256, "mask_size": 28, "score_thr": 0.05,
    "nms_iou": 0.5, "max_per_img": 100, "mask_thr": 0.5, "mask_output": "full", "interleaved": True,
    "mask_info_flow": True, "with_semantic": False, "semantic_num_classes": 183, "semantic_loss_weight": 0.2,
    "semantic_loss_avg_non_ignore": False, "semantic_fusion_level": 1, "mask_ensemble": "mean",
    "early_exit": {"policy": "none", "threshold": 0.9, "background_threshold": 0.0, "prune_threshold": 0.0,
                   "time_budget_ms": 0.0},
}


def old_model_dict(**roi_head) -> dict:
    """An old checkpoint's `meta['config']['model']` of a small Mask R-CNN."""
    model = to_dict(ModelConfig())
    model["roi_head"] = {**OLD_ROI_HEAD, **roi_head}
    model.update(preset="mask_rcnn_r18_fpn", num_classes=3)
    model["input"]["scale"] = [64, 64]
    model["backbone"].update(depth=18, frozen_stages=-1, norm_eval=False, base_channels=8)
    model["neck"]["out_channels"] = 16
    model["rpn"]["feat_channels"] = 16
    return model


def test_an_old_checkpoint_config_is_read_silently_into_the_sections():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # users did not write it: no warning
        cfg = model_config_from_dict(old_model_dict(fc_channels=32, mask_conv_channels=16, num_samples=64,
                                                    score_thr=0.2, mask_size=28, semantic_num_classes=9))
    head = cfg.roi_head
    assert head.box_head.fc_channels == 32 and head.mask_head.conv_channels == 16
    assert head.sampler.num_samples == 64 and head.test.score_thr == 0.2 and head.htc.semantic_num_classes == 9
    # a non-HTC head stored the HTC switches (then ignored): they are dropped, not an error
    assert head.htc.interleaved is None and head.htc.mask_info_flow is None
    # the same model in the new layout
    new = update(ModelConfig(), to_dict(cfg))
    assert new == cfg


def test_an_old_htc_checkpoint_config_keeps_its_switches():
    cfg = model_config_from_dict(old_model_dict(type="htc", num_stages=3, iou_thresholds=[0.5, 0.6, 0.7],
                                                stage_loss_weights=[1, 0.5, 0.25], bbox_stds=[[0.1] * 4] * 3,
                                                mask_info_flow=False, with_semantic=True))
    # the old default True meant "on for HTC": None now; an explicit False stays False
    assert cfg.roi_head.htc.interleaved is None and cfg.roi_head.htc.mask_info_flow is False
    assert cfg.roi_head.htc.with_semantic is True


def test_a_checkpoint_saved_with_the_old_layout_loads(tmp_path):
    old = old_model_dict(fc_channels=32, mask_conv_channels=16)
    torch.manual_seed(0)
    model = build_model(model_config_from_dict(old))
    path = save_checkpoint(tmp_path / "old.pth", {"state_dict": model.state_dict(),
                                                  "meta": {"config": {"model": old}, "iteration": 1}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = load_model(path, device="cpu")
    assert loaded.cfg.roi_head.box_head.fc_channels == 32
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_old_spellings_a_person_wrote_warn_once_each_and_land_in_the_sections(tmp_path):
    with pytest.warns(DeprecationWarning, match=r"^model\.roi_head\.score_thr is now model\.roi_head\.test\.score_thr$"):
        cfg = load_config("mask_rcnn_r18_fpn", ["model.roi_head.score_thr=0.3"])
    assert cfg.model.roi_head.test.score_thr == 0.3
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  preset: htc_r18_fpn\n  roi_head:\n    mask_roi_size: 7\n    semantic_num_classes: 5\n")
    with pytest.warns(DeprecationWarning) as record:
        cfg = load_config(path)
    assert sorted(str(w.message) for w in record) == [
        "model.roi_head.mask_roi_size is now model.roi_head.mask_head.roi_size",
        "model.roi_head.semantic_num_classes is now model.roi_head.htc.semantic_num_classes"]
    assert cfg.model.roi_head.mask_head.roi_size == 7 and cfg.model.roi_head.htc.semantic_num_classes == 5
    with pytest.warns(DeprecationWarning, match="roi_head.fc_channels is now roi_head.box_head.fc_channels"):
        model = build_model("mask_rcnn_r18_fpn", num_classes=3, roi_head={"fc_channels": 64})
    assert model.roi_head.bbox_head.fc_cls.in_features == 64


def test_an_old_and_a_new_spelling_of_one_key_is_an_error():
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="same key"):
        load_config(None, ["model.roi_head.score_thr=0.3", "model.roi_head.test.score_thr=0.2"])


def test_htc_switches_default_to_on_for_htc_and_are_an_error_elsewhere():
    htc = load_config("htc_r18_fpn").model
    assert htc.roi_head.htc.interleaved is None  # None: on for HTC
    model = build_model(htc, num_classes=3)
    assert model.roi_head.interleaved and model.roi_head.mask_info_flow
    off = build_model(htc, num_classes=3, roi_head={"htc": {"interleaved": False, "mask_info_flow": False}})
    assert not off.roi_head.interleaved and not off.roi_head.mask_info_flow
    with pytest.raises(ConfigError, match="^model.roi_head.htc.with_semantic is for HTC heads only"):
        load_config("cascade_mask_rcnn_r18_fpn", ["model.roi_head.htc.with_semantic=true"])
    with pytest.raises(ConfigError, match="^model.roi_head.htc.interleaved is for HTC heads only"):
        load_config("cascade_mask_rcnn_r18_fpn", ["model.roi_head.htc.interleaved=true"])


def test_an_old_run_config_yaml_of_a_cascade_still_loads(tmp_path):
    """Old config.yaml files wrote the (then ignored) HTC switches for every head: `interleaved: true`."""
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  preset: cascade_mask_rcnn_r18_fpn\n  roi_head:\n    type: cascade\n"
                    "    interleaved: true\n    mask_info_flow: true\n    with_semantic: false\n")
    with pytest.warns(DeprecationWarning) as caught:
        cfg = load_config(str(path))
    assert sorted(str(w.message) for w in caught) == [f"model.roi_head.{k} is now model.roi_head.htc.{k}"
                                                      for k in ("interleaved", "mask_info_flow", "with_semantic")]
    assert cfg.model.roi_head.htc.interleaved is None and not cfg.model.roi_head.htc.with_semantic


def test_one_early_exit_config_for_detectors_and_classifiers():
    detector = load_config("htc_r18_fpn", ["model.roi_head.early_exit.policy=entropy"]).model.roi_head.early_exit
    classifier = exits_config("mobile", ["early_exit.policy=entropy"]).early_exit
    assert type(detector) is type(classifier) and detector.policy == classifier.policy == "entropy"
    # the classifier's old spellings: section `policy`, field `kind`
    with pytest.warns(DeprecationWarning, match="policy is now early_exit"):
        old = exits_config("mobile", ["policy.kind=margin", "policy.threshold=0.5"]).early_exit
    assert old.policy == "margin" and old.threshold == 0.5
    stored = to_dict(exits_config("cloud"))
    stored["policy"] = {"kind": "patience", "patience": 3, "threshold": 0.95}  # an old model.pth's config
    del stored["early_exit"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = update(ExitsConfig(), stored, stored=True)
    assert dataclasses.astuple(cfg.early_exit)[:3] == ("patience", 0.95, ()) and cfg.early_exit.patience == 3
