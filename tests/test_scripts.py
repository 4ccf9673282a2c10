"""The shell scripts, ``scripts/thread_ranks.py`` and ``scripts/model_step.py``:
argument checks, short runs of both end to end, and how ``run.sh`` and
``test.sh`` install the package.

The install tests run the real scripts in a copy of the checkout's metadata
and scripts, with a fake ``.venv`` whose ``python`` (and ``ruff``,
``mpiexec``) only log how they were called: no network, no real install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Log the call; fake pip's record of an editable install and setuptools'
# warning about it (which the real one emits unless PYTHONWARNINGS filters it).
echo "python $*" >>"$FAKE_LOG"
if [ "$1 $2 $3" = "-m pip install" ]; then
    for arg in "$@"; do
        if [ "$arg" = -e ]; then
            record="$(dirname "$0")/../lib/python3.11/site-packages/arraysyncbn-0.1.0.dist-info"
            mkdir -p "$record"
            printf '{"dir_info": {"editable": true}, "url": "file://%s"}' "$PWD" \
                >"$record/direct_url.json"
            case "${PYTHONWARNINGS:-}" in
                *"ignore:Editable installation"*) ;;
                *) echo "BuildBackendWarning: Editable installation." >&2 ;;
            esac
        fi
    done
fi
exit 0
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the scripts and metadata with a fake, already created .venv."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fakes = {
        "python": FAKE_PYTHON,
        "ruff": '#!/usr/bin/env bash\necho "ruff $*" >>"$FAKE_LOG"\n',
        "mpiexec": '#!/usr/bin/env bash\necho "mpiexec $*" >>"$FAKE_LOG"\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def run_script(
    checkout: Path, name: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run scripts/NAME in ``checkout``; return the result and the fake tools' log."""
    log = checkout / "calls.log"
    log.write_text("")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    full_env.pop("RANKS", None)
    # PYTHON=false: had the fake .venv been missed, creating a real one fails.
    full_env.update(FAKE_LOG=str(log), ARRAYSYNCBN_TORCH="0", PYTHON="false")
    full_env.update(env)
    result = subprocess.run(
        [BASH, str(checkout / "scripts" / name)],
        cwd=checkout,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, log.read_text().splitlines()


def pip_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("python -m pip install")]


# -- issue 7, item 14 ------------------------------------------------------------------
def test_run_and_test_install_the_checkout_editable_once(checkout: Path) -> None:
    out, calls = run_script(checkout, "test.sh")
    assert out.returncode == 0, out.stderr
    assert pip_installs(calls) == ["python -m pip install -q -e .[test,mpi,lint,bench]"]
    assert "Editable installation" not in out.stderr, out.stderr
    out, calls = run_script(checkout, "run.sh")
    assert out.returncode == 0, out.stderr
    assert pip_installs(calls) == ["python -m pip install -q -e .[mpi]"]
    assert calls[-1] == "mpiexec -n 4 python -m arraysyncbn"
    for name in ("test.sh", "run.sh", "test.sh"):  # nothing changed: no pip at all
        out, calls = run_script(checkout, name)
        assert out.returncode == 0, out.stderr
        assert pip_installs(calls) == [], (name, calls)


def test_test_sh_reinstalls_when_the_metadata_or_the_install_changed(checkout: Path) -> None:
    run_script(checkout, "test.sh")
    with open(checkout / "setup.cfg", "a") as f:
        f.write("\n# a new dependency, say\n")
    _, calls = run_script(checkout, "test.sh")
    assert pip_installs(calls) == ["python -m pip install -q -e .[test,mpi,lint,bench]"]
    # Someone ran `pip install .` by hand: the install is no longer editable.
    for record in checkout.glob(".venv/lib/python*/site-packages/*.dist-info/direct_url.json"):
        record.write_text('{"dir_info": {}, "url": "file:///elsewhere"}')
    _, calls = run_script(checkout, "test.sh")
    assert pip_installs(calls) == ["python -m pip install -q -e .[test,mpi,lint,bench]"]


# -- issue 7, item 13 ------------------------------------------------------------------
@pytest.mark.parametrize("ranks", ["abc", "0", "-2", "2x", "4 "])
def test_run_sh_rejects_a_bad_rank_count_before_doing_anything(checkout, ranks: str) -> None:
    out, calls = run_script(checkout, "run.sh", RANKS=ranks)
    assert out.returncode == 2, out
    assert f"RANKS must be a positive integer (the number of MPI ranks), got '{ranks}'" in (
        out.stderr
    )
    assert calls == [], "nothing may be installed or launched"


def test_run_sh_passes_a_good_rank_count_to_mpiexec(checkout: Path) -> None:
    out, calls = run_script(checkout, "run.sh", RANKS="3")
    assert out.returncode == 0, out.stderr
    assert calls[-1] == "mpiexec -n 3 python -m arraysyncbn"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--ranks", "0"], "argument --ranks: must be at least 1, got 0"),
        (["--ranks", "x"], "argument --ranks: expected a positive integer, got 'x'"),
        (["--channels", "0"], "argument --channels: must be at least 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
    ],
)
def test_thread_ranks_rejects_bad_arguments_clearly(args: list[str], match: str) -> None:
    out = run_thread_ranks(args)
    assert out.returncode == 2, out
    assert match in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--ranks", "3", "--channels", "2"],  # uneven shards, rank 2's empty
        ["--ranks", "1", "--channels", "2", "--dtype", "float16"],
    ],
)
def test_thread_ranks_runs_and_reports_every_quantity_within_its_bound(args: list[str]) -> None:
    """The script end to end: its table lists every quantity, each ``ok``."""
    out = run_thread_ranks(args)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("quantity"))
    verdicts = {line.split()[0]: line.split()[-1] for line in lines[header + 1 : -1]}
    assert verdicts == dict.fromkeys(
        ["y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var"], "ok"
    ), out.stdout
    assert lines[-1] == "all within bounds", out.stdout


def run_thread_ranks(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/thread_ranks.py ARGS`` with this checkout's package."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "thread_ranks.py"), *args],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- scripts/gpu_check.sh ---------------------------------------------------------------
FAKE_GPU_PYTHON = r"""#!/usr/bin/env bash
# A python whose torch sees a GPU when FAKE_TORCH_CUDA=1 and that has no cupy.
echo "python $*" >>"$FAKE_LOG"
if [ "$1" = -c ]; then
    case "$2" in
        *"import cupy"*) exit 1 ;;
        *"sys.exit(not torch.cuda.is_available())"*) [ "${FAKE_TORCH_CUDA:-0}" = 1 ]; exit ;;
    esac
fi
exit 0
"""


@pytest.mark.parametrize("torch_cuda", ["1", "0"])
def test_gpu_check_runs_the_torch_gpu_tests_without_cupy(checkout, torch_cuda: str) -> None:
    """Without cupy, a GPU that torch sees still gets ``pytest -m gpu`` (the
    CUDA tensor and NCCL tests, first in a step of their own); with no GPU at
    all nothing runs (exit 2)."""
    fake = checkout / ".venv" / "bin" / "python"
    fake.write_text(FAKE_GPU_PYTHON)
    out_dir = checkout / "out"
    out, calls = run_script(
        checkout,
        "gpu_check.sh",
        PYTHON=str(fake),
        OUT=str(out_dir),
        FAKE_TORCH_CUDA=torch_cuda,
        MPIEXEC=str(checkout / ".venv" / "bin" / "mpiexec"),
    )
    pytest_calls = [c for c in calls if c.startswith("python -m pytest")]
    summary = (out_dir / "summary.txt").read_text()
    if torch_cuda == "1":
        assert out.returncode == 1, out.stdout + out.stderr
        want = (
            "python -m pytest -v -m gpu -p no:cacheprovider -rfEs --tb=short "
            "-o faulthandler_timeout=60 -p timeout --timeout 120"
        )
        torch_files = (
            "tests/test_torch_module.py tests/test_gradcheck.py tests/test_torch_distributed.py"
        )
        ignored = " ".join(f"--ignore {f}" for f in torch_files.split())
        # The torch CUDA tests first, on their own, then everything else once.
        assert pytest_calls == [f"{want} {torch_files}", f"{want} {ignored}"], calls
        assert "pytest -m gpu, torch CUDA tensors: exit 0" in summary
        assert "pytest -m gpu, the rest: exit 0" in summary
        assert "cupy MPI steps do not run" in summary
    else:
        assert out.returncode == 2, out.stdout + out.stderr
        assert pytest_calls == [] and "no CUDA GPU visible" in summary


def test_gpu_check_runs_both_cupy_routes_within_the_files_the_device_returns(checkout) -> None:
    """With cupy and MPI: pytest, then 1-rank benchmarks of the portable and the
    CUDA route, then per MPI path the properties of both routes, the check and
    2-rank benchmarks; everything in at most 6 files (the device tool returns 8)."""
    fake = checkout / ".venv" / "bin" / "python"
    fake.write_text('#!/usr/bin/env bash\necho "python $*" >>"$FAKE_LOG"\nexit 0\n')
    mpiexec = checkout / ".venv" / "bin" / "mpiexec"
    mpiexec.write_text(
        '#!/usr/bin/env bash\necho "mpiexec $* cuda=${ARRAYSYNCBN_CUDA_KERNELS:-}" >>"$FAKE_LOG"\n'
    )
    out_dir = checkout / "out"
    out, calls = run_script(
        checkout, "gpu_check.sh", PYTHON=str(fake), OUT=str(out_dir), MPIEXEC=str(mpiexec)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    calls = [c.replace(str(fake), "python") for c in calls]
    runs = [c for c in calls if c.startswith("mpiexec") and "arraysyncbn --shape" in c]
    bench = "python -m arraysyncbn --shape 32,64,56,56 --steps 30 --progress off"
    assert runs == [
        f"mpiexec -n 1 {bench} --backend cupy cuda=",
        f"mpiexec -n 1 {bench} --backend cupy cuda=1",
        f"mpiexec -n 2 {bench} --backend cupy cuda=",
        f"mpiexec -n 2 {bench} --backend cupy cuda=1",
        f"mpiexec -n 2 {bench} cuda=",
    ], calls
    props = [c for c in calls if "properties.py" in c]
    assert props == [
        "mpiexec -n 2 python -m mpi4py tests/mpi_scripts/properties.py 10 cupy cupy-cuda cuda="
    ]
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["bench.txt", "env.txt", "mpi.txt", "pytest_gpu.txt", "summary.txt"], files


# -- scripts/model_step.py ---------------------------------------------------------------
def test_model_step_times_both_models_and_reports_the_ratio() -> None:
    """A small run: both models train a step each repeat and the line names
    the layer count, both medians and their ratio; bad arguments exit 2."""
    pytest.importorskip("torch")
    script = str(ROOT / "scripts" / "model_step.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, script, "--size", "32", "--repeats", "3"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("9 batch-norm layers, batch 2, 32x32, 1 thread(s), median of 3"), line
    ratio = float(line.rsplit("ratio ", 1)[1])
    assert ratio > 0, line
    bad = subprocess.run(
        [sys.executable, script, "--repeats", "0"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "positive integer" in bad.stderr, bad.stderr
