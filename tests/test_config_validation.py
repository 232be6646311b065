"""Config values: scientific notation is a number, and every range and choice is checked when a config loads."""
import pytest

from cascadevision.config import Config, load_config, validate
from cascadevision.errors import ConfigError
from cascadevision.models.presets import preset_names


def test_scientific_notation_from_overrides_is_a_number():
    cfg = load_config("mask_rcnn_r18_fpn", ["train.lr=1e-3", "train.weight_decay=5E-2", "train.betas=[9e-1, 0.999]",
                                            "train.max_iters=2e3"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 0.001
    assert cfg.train.weight_decay == 0.05
    assert cfg.train.betas == (0.9, 0.999)
    assert isinstance(cfg.train.max_iters, int) and cfg.train.max_iters == 2000


def test_scientific_notation_in_a_yaml_file_is_a_number(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  preset: mask_rcnn_r18_fpn\n  roi_head:\n    test:\n      score_thr: 1.0e-3\n"
                    "train:\n  lr: 1e-4\n  weight_decay: 5.0e-2\n  max_iters: 1e3\n")
    cfg = load_config(path)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 0.0001
    assert cfg.train.weight_decay == 0.05 and cfg.model.roi_head.test.score_thr == 0.001
    assert cfg.train.max_iters == 1000


def test_a_fraction_is_not_an_integer_and_a_word_is_not_a_number():
    with pytest.raises(ConfigError, match="'train.max_iters' must be an integer"):
        load_config(None, ["train.max_iters=1e-3"])
    with pytest.raises(ConfigError, match="'train.lr' must be a number"):
        load_config(None, ["train.lr=e-3"])


def test_every_preset_and_the_defaults_pass():
    validate(Config())
    for name in preset_names():
        load_config(name)


BAD_VALUES = [
    (["train.max_iters=-5"], "train.max_iters must be >= 0, got -5"),
    (["train.max_iters=0", "train.epochs=0"], "training needs train.max_iters > 0 or train.epochs > 0"),
    (["train.epochs=-1"], "train.epochs must be >= 0"),
    (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    (["data.flip_prob=1.5"], "data.flip_prob must be in [0, 1]"),
    (["data.min_size=-2"], "data.min_size must be >= 0"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["train.lr=-1e-3"], "train.lr must be > 0"),
    (["train.lr=.nan"], "train.lr must be a finite number"),
    (["train.momentum=2"], "train.momentum must be in [0, 1]"),
    (["train.betas=[0.9, 1.0]"], "train.betas (each value) must be in [0, 1)"),
    (["train.weight_decay=-1e-4"], "train.weight_decay must be >= 0"),
    (["train.warmup_iters=-1"], "train.warmup_iters must be >= 0"),
    (["train.warmup_ratio=2"], "train.warmup_ratio must be in [0, 1]"),
    (["train.lr_gamma=0"], "train.lr_gamma must be > 0"),
    (["train.lr_steps=[8, -1]"], "train.lr_steps (each value) must be >= 0"),
    (["train.min_lr_ratio=-0.1"], "train.min_lr_ratio must be in [0, 1]"),
    (["train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints must be >= 0"),
    (["train.log_interval=-10"], "train.log_interval must be >= 0"),
    (["train.checkpoint_interval=-1"], "train.checkpoint_interval must be >= 0"),
    (["train.optimizer=adam"], "train.optimizer must be one of sgd, adamw, got 'adam'"),
    (["train.lr_schedule=poly"], "train.lr_schedule must be one of step, cosine"),
    (["train.device=gpu"], "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["model.num_classes=0"], "model.num_classes must be >= 1"),
    (["model.input.scale=[1333, 0]"], "model.input.scale (each value) must be >= 1"),
    (["model.input.std=[58, 0, 57]"], "model.input.std (each value) must be > 0"),
    (["model.backbone.depth=42"], "model.backbone.depth must be one of 18, 34, 50, 101, 152"),
    (["model.backbone.type=vgg"], "model.backbone.type must be one of resnet, efficientvit_m0"),
    (["model.backbone.frozen_stages=-2"], "model.backbone.frozen_stages must be in [-1, 4]"),
    (["model.rpn.pos_iou=0"], "model.rpn.pos_iou must be in (0, 1]"),
    (["model.rpn.nms_iou=1.2"], "model.rpn.nms_iou must be in (0, 1]"),
    (["model.rpn.neg_iou=0.8"], "model.rpn.neg_iou (0.8) must not exceed model.rpn.pos_iou (0.7)"),
    (["model.rpn.pos_fraction=-0.5"], "model.rpn.pos_fraction must be in [0, 1]"),
    (["model.rpn.loss_bbox=l2"], "model.rpn.loss_bbox must be one of l1, smooth_l1"),
    (["model.rpn.test_post_nms=0"], "model.rpn.test_post_nms must be >= 1"),
    (["model.neck.num_outs=4"], "model.rpn.anchor_strides has 5 levels but model.neck.num_outs is 4"),
    (["model.roi_head.iou_thresholds=[0]"], "model.roi_head.iou_thresholds (each value) must be in (0, 1]"),
    (["model.roi_head.num_stages=3"], "model.roi_head.iou_thresholds needs 3 entries"),
    (["model.roi_head.test.score_thr=1.5"], "model.roi_head.test.score_thr must be in [0, 1]"),
    (["model.roi_head.test.mask_thr=-0.5"], "model.roi_head.test.mask_thr must be in [0, 1]"),
    (["model.roi_head.test.max_per_img=0"], "model.roi_head.test.max_per_img must be >= 1"),
    (["model.roi_head.test.nms_iou=0"], "model.roi_head.test.nms_iou must be in (0, 1]"),
    (["model.roi_head.type=two_stage"], "model.roi_head.type must be one of standard, cascade, htc"),
    (["model.roi_head.test.mask_ensemble=max"], "model.roi_head.test.mask_ensemble must be one of mean, last"),
    (["model.roi_head.test.mask_output=rle"], "model.roi_head.test.mask_output must be one of full, probs"),
    (["model.roi_head.sampler.num_samples=0"], "model.roi_head.sampler.num_samples must be >= 1"),
    (["model.roi_head.sampler.pos_fraction=2"], "model.roi_head.sampler.pos_fraction must be in [0, 1]"),
    (["model.roi_head.box_head.loss_bbox=l2"], "model.roi_head.box_head.loss_bbox must be one of l1, smooth_l1"),
    (["model.roi_head.box_head.fc_channels=0"], "model.roi_head.box_head.fc_channels must be >= 1"),
    (["model.roi_head.mask_head.num_convs=-1"], "model.roi_head.mask_head.num_convs must be >= 0"),
    (["model.roi_head.mask_head.size=0"], "model.roi_head.mask_head.size must be >= 1"),
    (["model.roi_head.htc.semantic_loss_weight=-1"], "model.roi_head.htc.semantic_loss_weight must be >= 0"),
    (["model.preset=htc_r18_fpn", "model.roi_head.htc.semantic_fusion_level=5"],
     "model.roi_head.htc.semantic_fusion_level must be a neck level below model.neck.num_outs (5), got 5"),
    (["model.preset=cascade_mask_rcnn_r18_fpn", "model.roi_head.htc.interleaved=true"],
     "model.roi_head.htc.interleaved is for HTC heads only (model.roi_head.type: htc), and this head is 'cascade'"),
    (["model.roi_head.htc.mask_info_flow=true"], "model.roi_head.htc.mask_info_flow is for HTC heads only"),
    (["model.roi_head.htc.with_semantic=true"], "model.roi_head.htc.with_semantic is for HTC heads only"),
    (["model.roi_head.early_exit.policy=confidence"],
     "model.roi_head.early_exit.policy must be one of none, max_prob, entropy, margin"),
    (["model.roi_head.early_exit.threshold=1.5"], "model.roi_head.early_exit.threshold must be in [0, 1]"),
    (["model.roi_head.early_exit.time_budget_ms=-1"], "model.roi_head.early_exit.time_budget_ms must be >= 0"),
    (["model.roi_head.early_exit.policy=patience"],  # a classifier's policy, not a region's
     "model.roi_head.early_exit.policy must be one of none, max_prob, entropy, margin"),
    (["model.roi_head.early_exit.background_threshold=2"],
     "model.roi_head.early_exit.background_threshold must be in [0, 1]"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[o[0][0] for o in BAD_VALUES])
def test_a_bad_value_is_a_one_line_error_naming_its_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_value_in_a_yaml_file_fails_at_load(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="data.batch_size must be >= 1, got 0"):
        load_config(path)


def test_validate_takes_a_section_with_its_place():
    from cascadevision.config import DataConfig

    validate(DataConfig())
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0, got -3"):
        validate(DataConfig(num_workers=-3), "data.")


# the old flat spellings of model.roi_head (before the sampler / box_head / mask_head / test / htc sections)
OLD_SPELLINGS = [
    (["model.roi_head.score_thr=1.5"], "model.roi_head.test.score_thr must be in [0, 1]"),
    (["model.roi_head.mask_ensemble=max"], "model.roi_head.test.mask_ensemble must be one of mean, last"),
    (["model.roi_head.mask_num_convs=-1"], "model.roi_head.mask_head.num_convs must be >= 0"),
    (["model.roi_head.loss_bbox=l2"], "model.roi_head.box_head.loss_bbox must be one of l1, smooth_l1"),
    (["model.roi_head.num_samples=0"], "model.roi_head.sampler.num_samples must be >= 1"),
    (["model.roi_head.with_semantic=true"], "model.roi_head.htc.with_semantic is for HTC heads only"),
]


@pytest.mark.parametrize("overrides,message", OLD_SPELLINGS, ids=[o[0][0] for o in OLD_SPELLINGS])
def test_an_old_spelling_is_read_with_a_warning_and_errors_name_the_new_key(overrides, message):
    with pytest.warns(DeprecationWarning, match=r"model\.roi_head\.\w+ is now model\.roi_head\.\w+\.\w+"):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
