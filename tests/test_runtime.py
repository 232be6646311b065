"""The CPU runtime set-up: cgroup quota parsing, and the CLI setting a passive OpenMP wait policy before torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascadevision.runtime import available_cpus, cgroup_cpu_limit

REPO = Path(__file__).resolve().parents[1]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files,cpus", [
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no quota
    ({"cpu.max": "200000 100000\n"}, 2.0),  # v2: 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "50000 100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no quota
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "25000\n", "cpu/cpu.cfs_period_us": "50000\n"}, 0.5),
    ({}, None),  # no cgroup files at all
    ({"cpu.max": "garbage\n"}, None),
])
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, cpus):
    assert cgroup_cpu_limit(write(tmp_path, files)) == cpus


def test_available_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(write(tmp_path / "none", {"cpu.max": "max 100000"})) == affinity
    assert available_cpus(write(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    assert available_cpus(write(tmp_path / "big", {"cpu.max": f"{1000 * 100000} 100000"})) == affinity
    if affinity >= 2:
        assert available_cpus(write(tmp_path / "one", {"cpu.max": "100000 100000"})) == 1


def run_clean(code: str, **env) -> dict:
    """Run `code` in a fresh interpreter without any OpenMP variables; it prints one JSON line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    clean["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


HEAVY = ("torch", "pycocotools", "tqdm", "matplotlib", "cascadevision.engine", "cascadevision.engine.trainer",
         "cascadevision.models")


def test_importing_the_package_loads_nothing_heavy():
    result = run_clean("import json, sys, cascadevision\n"
                       f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert result == []


def test_the_public_names_still_import_from_the_package():
    result = run_clean("import json, cascadevision\n"
                       "from cascadevision import Config, ModelConfig, build_model, load_config, load_weights\n"
                       "print(json.dumps([callable(f) for f in (Config, ModelConfig, build_model, load_config,"
                       " load_weights)] + [sorted(cascadevision.__all__), cascadevision.__version__]))")
    assert result[:5] == [True] * 5
    assert result[5] == sorted(["__version__", "Config", "ModelConfig", "build_model", "load_config", "load_weights"])
    with pytest.raises(subprocess.CalledProcessError):
        run_clean("import cascadevision; cascadevision.no_such_name")


def test_the_cli_sets_a_passive_wait_policy_before_torch_is_imported():
    result = run_clean("import json, os, sys, cascadevision.cli\n"
                       "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules]))")
    assert result == ["PASSIVE", False]


def test_a_wait_policy_the_user_set_is_kept():
    result = run_clean("import json, os, cascadevision.cli\nprint(json.dumps(os.environ['OMP_WAIT_POLICY']))",
                       OMP_WAIT_POLICY="ACTIVE")
    assert result == "ACTIVE"


def test_nothing_is_set_once_torch_is_loaded():
    result = run_clean("import json, os, torch\nfrom cascadevision.runtime import configure_cpu_runtime\n"
                       "made = configure_cpu_runtime()\n"
                       "print(json.dumps([made, os.environ.get('OMP_WAIT_POLICY')]))")
    assert result[1] is None and "OMP_WAIT_POLICY" not in result[0]


def test_a_cgroup_quota_sets_the_thread_count(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 CPUs in the affinity mask")
    root = write(tmp_path, {"cpu.max": "100000 100000"})  # a one-CPU container
    result = run_clean("import json, os\nfrom cascadevision.runtime import configure_cpu_runtime\n"
                       f"made = configure_cpu_runtime({str(root)!r})\n"
                       "import torch\nprint(json.dumps([made, torch.get_num_threads()]))")
    assert result == [{"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}, 1]
    result = run_clean("import json, os\nfrom cascadevision.runtime import configure_cpu_runtime\n"
                       f"made = configure_cpu_runtime({str(root)!r})\n"
                       "print(json.dumps(made))", OMP_NUM_THREADS="2")
    assert result == {"OMP_WAIT_POLICY": "PASSIVE"}
