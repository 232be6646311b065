"""Running a multi-exit model: simulate, compact, anytime, or the full model.

- `simulate`: every stage and every exit runs on every sample; the policy then picks each sample's exit. Exact
  accounting (which exit, what cost) for analysis and calibration, and no time saved at all.
- `compact`: real early exit in batches. After exit k the samples that leave are written to their place in the
  output and only the survivors (and their rows of the state and of the policy's memory) go on to stage k+1;
  the loop ends when nobody is left. Batch size 1 is the same code, where a stage either keeps or drops its
  only sample. For the same policy its answers are `simulate`'s answers, in input order.
- `anytime`: a time budget in ms; stages run while there is time, and each sample gets the best answer so far:
  the most confident exit (SDN's rule), the ensemble (mean probability) of the exits computed, or the last one.
- `run_full`: the model without early exits (every stage, only the last head), the baseline for wall time.

All run under `torch.no_grad()` and expect the model in eval mode (BatchNorm must not see partial batches).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .models import MultiExitModel, select
from .policies import ExitPolicy, decide_exits, exit_decision


@dataclass
class ExitResult:
    logits: Tensor  # (N, C) the logits of the exit that answered each sample, in input order
    exit_stage: Tensor  # (N,) index of that exit (0-based)
    num_stages: int
    stage_batch_sizes: list[int] = field(default_factory=list)  # samples each stage really processed
    wall_time_s: float = 0.0
    all_logits: list[Tensor] | None = None  # `simulate` only: every exit's logits
    stages_run: int = 0  # `anytime`: how many stages ran before the budget ran out

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)

    def exit_counts(self) -> list[int]:
        return torch.bincount(self.exit_stage.cpu(), minlength=self.num_stages).tolist()


def _chunks(x: Tensor, batch_size: int | None):
    if not batch_size or x.shape[0] <= batch_size:
        yield x
    else:
        yield from x.split(batch_size)


def _merge(results: list[ExitResult]) -> ExitResult:
    if len(results) == 1:
        return results[0]
    sizes = [0] * results[0].num_stages
    for r in results:
        for k, s in enumerate(r.stage_batch_sizes):
            sizes[k] += s
    all_logits = None
    if results[0].all_logits is not None:
        all_logits = [torch.cat([r.all_logits[k] for r in results]) for k in range(results[0].num_stages)]
    return ExitResult(torch.cat([r.logits for r in results]), torch.cat([r.exit_stage for r in results]),
                      results[0].num_stages, sizes, sum(r.wall_time_s for r in results), all_logits,
                      max(r.stages_run for r in results))


@torch.no_grad()
def simulate(model: MultiExitModel, x: Tensor, policy: ExitPolicy, batch_size: int | None = None) -> ExitResult:
    """Compute every exit for every sample, then let the policy choose (no compute is saved)."""
    start = time.perf_counter()
    all_logits: list[list[Tensor]] = [[] for _ in range(model.num_stages)]
    all_features: list[list[Tensor]] = [[] for _ in range(model.num_stages)]
    for chunk in _chunks(x, batch_size):
        logits, features = model.forward_with_features(chunk, features=policy.needs_features)
        for k in range(model.num_stages):
            all_logits[k].append(logits[k])
            if policy.needs_features:
                all_features[k].append(features[k])
    logits = [torch.cat(parts) for parts in all_logits]
    features = [torch.cat(parts) for parts in all_features] if policy.needs_features else None
    exit_stage = decide_exits(policy, logits, features)
    stacked = torch.stack(logits)  # (num_stages, N, C)
    chosen = stacked[exit_stage, torch.arange(x.shape[0], device=x.device)]
    return ExitResult(chosen, exit_stage, model.num_stages, [x.shape[0]] * model.num_stages,
                      time.perf_counter() - start, logits, model.num_stages)


@torch.no_grad()
def compact(model: MultiExitModel, x: Tensor, policy: ExitPolicy, batch_size: int | None = None) -> ExitResult:
    """Real early exit: after each exit only the samples still undecided go on to the next stage."""
    return _merge([_compact(model, chunk, policy) for chunk in _chunks(x, batch_size)])


def _compact(model: MultiExitModel, x: Tensor, policy: ExitPolicy) -> ExitResult:
    start = time.perf_counter()
    n, num_stages = x.shape[0], model.num_stages
    if policy.never_exits:
        logits = model.forward_final(x)
        return ExitResult(logits, torch.full((n,), num_stages - 1, dtype=torch.long, device=x.device),
                          num_stages, [n] * num_stages, time.perf_counter() - start, stages_run=num_stages)
    out: Tensor | None = None
    exit_stage = torch.empty(n, dtype=torch.long, device=x.device)
    index = torch.arange(n, device=x.device)  # original positions of the samples still running
    memory = policy.init_memory(n, x.device)
    sizes = []
    state = x
    for k in range(num_stages):
        state = model.stages[k](state)
        logits = model.exits[k](state)  # (n_alive, C)
        sizes.append(logits.shape[0])
        if out is None:
            out = logits.new_empty((n, logits.shape[1]))
        features = model.exit_features(k, state) if policy.needs_features else None
        leaving = exit_decision(policy, logits, k, num_stages, memory, features)
        if bool(leaving.all()):  # one host sync per exit: everybody still here is done
            out[index] = logits
            exit_stage[index] = k
            break
        if bool(leaving.any()):
            out[index[leaving]] = logits[leaving]
            exit_stage[index[leaving]] = k
            staying = ~leaving
            index = index[staying]
            state = select(state, staying)
            memory = {name: value[staying] for name, value in memory.items()}
    return ExitResult(out, exit_stage, num_stages, sizes, time.perf_counter() - start, stages_run=len(sizes))


@torch.no_grad()
def run_full(model: MultiExitModel, x: Tensor, batch_size: int | None = None) -> Tensor:
    """The model without early exits: (N, C) logits of the last exit, intermediate heads skipped."""
    return torch.cat([model.forward_final(chunk) for chunk in _chunks(x, batch_size)])


ANSWERS = ("confident", "ensemble", "last")


@torch.no_grad()
def anytime(model: MultiExitModel, x: Tensor, budget_ms: float, answer: str = "confident",
            clock: Callable[[], float] = time.perf_counter, stop_before_overrun: bool = True) -> ExitResult:
    """Run stages while the budget lasts; return each sample's best answer so far.

    The first stage always runs (there must be an answer). After stage k the elapsed time is read from
    `clock` (seconds); the loop stops when the budget is spent or, with `stop_before_overrun`, when the next
    stage would overrun it if it took as long as the stage just finished. `answer`: "confident" (the exit with
    the highest max-probability so far), "ensemble" (log of the mean softmax of the exits so far), "last".
    Inject `clock` to make the budget deterministic (tests).
    """
    if answer not in ANSWERS:
        raise ConfigError(f"anytime answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
    n, num_stages = x.shape[0], model.num_stages
    start = previous = clock()
    state = x
    best_logits = best_conf = best_stage = prob_sum = None
    stages_run = 0
    for k in range(num_stages):
        state = model.stages[k](state)
        logits = model.exits[k](state)  # (N, C)
        stages_run = k + 1
        probs = F.softmax(logits.float(), dim=-1)
        if best_logits is None:
            best_logits, best_conf = logits.clone(), probs.max(-1).values
            best_stage = torch.zeros(n, dtype=torch.long, device=x.device)
            prob_sum = probs
        else:
            conf = probs.max(-1).values
            better = conf > best_conf
            best_logits[better], best_conf[better], best_stage[better] = logits[better], conf[better], k
            prob_sum = prob_sum + probs
            if answer == "last":
                best_logits, best_stage = logits, torch.full_like(best_stage, k)
        now = clock()
        elapsed_ms, last_ms = (now - start) * 1e3, (now - previous) * 1e3
        previous = now
        if elapsed_ms >= budget_ms or (stop_before_overrun and elapsed_ms + last_ms > budget_ms):
            break
    wall = clock() - start
    if answer == "ensemble":
        logits = (prob_sum / stages_run).log()  # softmax of this is the mean probability
        stage = torch.full((n,), stages_run - 1, dtype=torch.long, device=x.device)
        return ExitResult(logits, stage, num_stages, [n] * stages_run, wall, stages_run=stages_run)
    return ExitResult(best_logits, best_stage, num_stages, [n] * stages_run, wall, stages_run=stages_run)
