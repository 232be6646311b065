"""Early-exit cascades: easy inputs leave early, hard ones run every stage, and the saving is measured.

    model = MultiExitResNet(ExitModelConfig(num_stages=4))           # or ModelCascade.from_config(...)
    costs = model.stage_costs(torch.zeros(1, 1, 32, 32))             # MACs per stage body and exit head
    policy = MaxProbPolicy(0.95)                                     # entropy, margin, patience, learned gate
    result = compact(model.eval(), images, policy)                   # real batch compaction, input order kept
    stats = ExitStatistics.from_exits(result.exit_stage, costs.cumulative, costs.full, result.predictions == y)
    print(stats.table())

Files: `models.py` (containers, costs), `policies.py`, `execution.py` (simulate / compact / anytime),
`calibration.py`, `training.py`, `stats.py`, `data.py` (digits), `presets.py`, `pipeline.py`, `cli.py`.
"""
from .calibration import (Calibration, assign_exits, calibrate, calibrate_for_accuracy, calibrate_for_budget,
                          geometric_exit_distribution, quantile_thresholds, summarize_exits)
from ..config import EarlyExitConfig
from .config import ExitDataConfig, ExitModelConfig, ExitPolicyConfig, ExitRunConfig, ExitsConfig, ExitTrainConfig
from .execution import ExitResult, anytime, compact, run_full, simulate
from .models import ModelCascade, MultiExitModel, MultiExitResNet, StageCosts, build_exit_model, select
from .policies import (EntropyPolicy, ExitGate, ExitPolicy, GatePolicy, MarginPolicy, MaxProbPolicy, NoEarlyExit,
                       PatiencePolicy, ThresholdPolicy, build_policy, decide_exits, exit_decision, softmax_entropy,
                       softmax_margin)
from .presets import exits_config, preset_names
from .stats import ExitStatistics, plot_accuracy_vs_compute
from .training import confidence_gate_weights, multi_exit_loss, sdn_weights, subset_loss, train_gates, train_multi_exit

__all__ = [
    "Calibration", "assign_exits", "calibrate", "calibrate_for_accuracy", "calibrate_for_budget",
    "geometric_exit_distribution", "quantile_thresholds", "summarize_exits",
    "EarlyExitConfig", "ExitDataConfig", "ExitModelConfig", "ExitPolicyConfig", "ExitRunConfig", "ExitsConfig", "ExitTrainConfig",
    "ExitResult", "anytime", "compact", "run_full", "simulate",
    "ModelCascade", "MultiExitModel", "MultiExitResNet", "StageCosts", "build_exit_model", "select",
    "EntropyPolicy", "ExitGate", "ExitPolicy", "GatePolicy", "MarginPolicy", "MaxProbPolicy", "NoEarlyExit",
    "PatiencePolicy", "ThresholdPolicy", "build_policy", "decide_exits", "exit_decision", "softmax_entropy",
    "softmax_margin",
    "exits_config", "preset_names", "ExitStatistics", "plot_accuracy_vs_compute",
    "confidence_gate_weights", "multi_exit_loss", "sdn_weights", "subset_loss", "train_gates", "train_multi_exit",
]
