"""The launch scripts: syntax, shellcheck (when installed) and what they would run.

`tpu_pod.sh` is run with TPU_DRY_RUN=1 (prints its gcloud commands); `slurm_gpu.sbatch`
runs with stand-ins for `scontrol`, `srun` (two tasks) and Python (prints its setup).
"""

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(ROOT, "launch", name) for name in ("tpu_pod.sh", "slurm_gpu.sbatch")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", script], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    # CI installs it (.ci/run); elsewhere the skip says why.
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
      pytest.fail("CI=true and shellcheck is not installed (.ci/run installs it)",
                  pytrace=False)
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def _tpu(*args, **env):
  base = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  return subprocess.run(["bash", SCRIPTS[0], *args], capture_output=True, text=True,
                        env=dict(base, TPU_DRY_RUN="1", **env), check=True).stdout


def test_tpu_pod_commands():
  create = _tpu("create", TPU_NAME="pod", TPU_TYPE="v5litepod-16", TPU_ZONE="z", TPU_SPOT="1",
                TPU_PROJECT="proj")
  assert create.startswith("gcloud compute tpus tpu-vm create pod --zone=z "
                           "--accelerator-type=v5litepod-16")
  assert "--spot" in create and "--project=proj" in create
  copy = _tpu("copy", "/tmp/data.pkl").splitlines()
  assert all("--worker=all" in line for line in copy)
  assert "tpu-vm scp" in copy[0] and "tpu-vm scp /tmp/data.pkl" in copy[-1]
  setup = _tpu("setup")
  assert "jax[tpu]" in setup and "--worker=all" in setup
  run = _tpu("run", "--config=configs/lidc.py", "--workdir=gs://b/runs/a b")
  assert "tpu-vm ssh prosona" in run and "--worker=all" in run
  assert "prosona_jax.main\\ --distributed\\ --config=configs/lidc.py" in run
  assert "gs://b/runs/a\\\\\\ b" in run  # The space survives both shells.


def test_tpu_pod_rejects_unknown_command():
  result = subprocess.run(["bash", SCRIPTS[0], "launch"], capture_output=True, text=True)
  assert result.returncode == 2 and "unknown command" in result.stderr


def _stub(path, body: str) -> None:
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_sets_up_every_process(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir / "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
  # srun: drop its options, run the command once per task as Slurm would.
  _stub(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done\n'
        'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done\n')
  _stub(bin_dir / "fake_python", 'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES '
        '$JAX_PROCESS_ID ${CUDA_VISIBLE_DEVICES:-all} $*"\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="fake_python",
             SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_JOB_ID="1234", SLURM_NTASKS="2",
             SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(tmp_path), PROSONA_VENV="none")
  env.pop("CUDA_VISIBLE_DEVICES", None)
  out = subprocess.run(["bash", SCRIPTS[1], "--config=configs/lidc.py", "--workdir=/shared/a b"],
                       capture_output=True, text=True, env=env, check=True).stdout
  lines = out.splitlines()[1:]
  assert lines == [
      f"gpu-node-07:21234 2 {i} all -m prosona_jax.main --distributed "
      "--config=configs/lidc.py --workdir=/shared/a b" for i in (0, 1)]
  # One process per GPU: each task keeps its own entry of the node's GPU list.
  env.update(SLURM_NTASKS_PER_NODE="2", CUDA_VISIBLE_DEVICES="4,5")
  out = subprocess.run(["bash", SCRIPTS[1], "--workdir=w"], capture_output=True, text=True,
                       env=env, check=True).stdout
  assert [line.split()[3] for line in out.splitlines()[1:]] == ["4", "5"]
