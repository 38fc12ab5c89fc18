"""Launch scripts in dry-run with fake gcloud / srun on PATH: the commands they would run."""
import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["cm3jax", "train", "--config=configs/cm3leon.py:350m", "--workdir=gs://bucket/run"]


def _fake_tools(tmp_path, tpu_exists: bool):
    """gcloud and srun stand-ins that log their arguments; `describe` answers whether the TPU VM exists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "gcloud").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "gcloud $*" >> {log}\n'
        f'if [[ "$*" == *" describe "* ]]; then exit {0 if tpu_exists else 1}; fi\n')
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "srun $*" >> {log}\n')
    for tool in ("gcloud", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), log


def _run(script, args, env, dry_run=True):
    env = dict(env, DRY_RUN="1") if dry_run else env
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def _printed_commands(stdout):
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", ["tpu.sh", "gpu.sh", "slurm.sbatch"])
def test_help(script):
    out = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "cm3jax" in out.stdout and "DRY_RUN" in out.stdout


def test_tpu_creates_missing_vm_ships_code_installs_and_runs_on_all_workers(tmp_path):
    env, log = _fake_tools(tmp_path, tpu_exists=False)
    out = _run("tpu.sh", ["--name=pod", "--zone=us-central2-b", "--accelerator=v4-32", "--spot", "--delete",
                          "--", *TRAIN], env)
    assert out.returncode == 0, out.stderr
    commands = _printed_commands(out.stdout)
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b",
                           "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    assert commands[1][:3] == ["git", "-C", os.path.join(REPO, "launch", "..")] and "archive" in commands[1]
    assert commands[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in commands[2]
    ssh = [c for c in commands if c[4] == "ssh"]
    assert all("--worker=all" in c for c in ssh)
    assert "pip install -q -e '.[gcs]' 'jax[tpu]'" in ssh[-2][-1]  # the workers read and write a bucket
    assert " ".join(TRAIN) in ssh[-1][-1]
    assert commands[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=us-central2-b", "--quiet"]
    # Only the read-only query reached gcloud.
    assert log.read_text().splitlines() == ["gcloud compute tpus tpu-vm describe pod --zone=us-central2-b"]


def test_tpu_reuses_existing_vm_and_pulls_from_git(tmp_path):
    env, _ = _fake_tools(tmp_path, tpu_exists=True)
    out = _run("tpu.sh", ["--name=pod", "--zone=z", "--project=p", "--repo=https://example.org/cm3jax.git",
                          "--branch=dev", "--", *TRAIN], env)
    assert out.returncode == 0, out.stderr
    commands = _printed_commands(out.stdout)
    assert not any("create" in c for c in commands)
    assert "git clone --branch dev https://example.org/cm3jax.git" in commands[0][-1]
    assert all("--project=p" in c for c in commands)


def test_tpu_rejects_missing_arguments(tmp_path):
    env, _ = _fake_tools(tmp_path, tpu_exists=False)
    assert _run("tpu.sh", ["--zone=z", "--", *TRAIN], env).returncode == 2
    assert "--accelerator" in _run("tpu.sh", ["--name=n", "--zone=z", "--", *TRAIN], env).stderr


def test_gpu_runs_the_command_with_all_local_gpus(tmp_path):
    env, _ = _fake_tools(tmp_path, tpu_exists=False)
    out = _run("gpu.sh", ["--install", "--gpus=0,1", "--", *TRAIN], env)
    assert out.returncode == 0, out.stderr
    commands = _printed_commands(out.stdout)
    assert commands[0] == ["python3", "-m", "venv", os.path.join(REPO, ".venv")]
    assert "jax[cuda12]" in commands[1]
    assert "CUDA_VISIBLE_DEVICES=0,1" in out.stdout
    assert commands[-1] == TRAIN


def test_slurm_runs_one_process_per_node_through_srun(tmp_path):
    env, log = _fake_tools(tmp_path, tpu_exists=False)
    dry = _run("slurm.sbatch", ["--", *TRAIN], env)
    assert dry.returncode == 0, dry.stderr
    (srun,) = _printed_commands(dry.stdout)
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"] and srun[-len(TRAIN):] == TRAIN
    real = _run("slurm.sbatch", ["--", *TRAIN], env, dry_run=False)  # the fake srun records its arguments
    assert real.returncode == 0, real.stderr
    assert log.read_text().strip().endswith(" ".join(TRAIN))


def test_user_values_reaching_a_remote_shell_stay_values(tmp_path):
    env, _ = _fake_tools(tmp_path, tpu_exists=True)
    out = _run("tpu.sh", ["--name=pod", "--zone=z", "--repo=https://example.org/x.git; touch /tmp/repo-owned",
                          "--branch=main; touch /tmp/branch-owned", "--", *TRAIN], env)
    assert out.returncode == 0, out.stderr
    remote = _printed_commands(out.stdout)[0][-1].removeprefix("--command=")
    words = shlex.split(remote)  # how the worker's shell splits it
    assert "main; touch /tmp/branch-owned" in words and "https://example.org/x.git; touch /tmp/repo-owned" in words
    assert "touch" not in words


def test_tpu_exits_with_the_commands_status_warns_of_uncommitted_edits_and_leaves_no_archive(tmp_path):
    """A real (not dry) run against a gcloud stand-in that runs the workers' command here."""
    root, home, temp = tmp_path / "checkout", tmp_path / "home", tmp_path / "tmp"
    for folder in (root / "launch", home / "cm3jax", temp):
        folder.mkdir(parents=True)
    subprocess.run(["cp", os.path.join(REPO, "launch", "tpu.sh"), str(root / "launch")], check=True)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(  # the TPU VM exists; only the command that runs COMMAND is carried out
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do [[ "$a" == --command=*"tee -a"* ]] && exec bash -c "${a#--command=}"; done\n'
        "exit 0\n")
    os.chmod(bin_dir / "gcloud", 0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), TMPDIR=str(temp))
    for command, status in (("true", 0), ("false", 1)):
        out = subprocess.run(["bash", str(root / "launch" / "tpu.sh"), "--name=pod", "--zone=z", "--", command],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == status, out.stderr
        assert "uncommitted" not in out.stderr and os.listdir(temp) == []
    (root / "edit.py").write_text("x = 1\n")
    out = subprocess.run(["bash", str(root / "launch" / "tpu.sh"), "--name=pod", "--zone=z", "--", "true"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "uncommitted changes" in out.stderr and os.listdir(temp) == []


@pytest.mark.parametrize("script,args", [
    ("tpu.sh", ["--name=pod", "--zone=z", "--accelerator=v4-8", "--", *TRAIN]),
    ("gpu.sh", ["--", *TRAIN]),
    ("slurm.sbatch", ["--", *TRAIN]),
])
def test_a_dry_run_creates_nothing(tmp_path, script, args):
    env, _ = _fake_tools(tmp_path, tpu_exists=False)
    root, temp = tmp_path / "checkout", tmp_path / "tmp"
    (root / "launch").mkdir(parents=True)
    temp.mkdir()
    subprocess.run(["cp", os.path.join(REPO, "launch", script), str(root / "launch")], check=True)
    out = subprocess.run(["bash", str(root / "launch" / script), *args], env=dict(env, DRY_RUN="1", TMPDIR=str(temp)),
                         capture_output=True, text=True, timeout=60, cwd=root)
    assert out.returncode == 0, out.stderr
    assert os.listdir(root) == ["launch"] and os.listdir(temp) == []


def test_the_slurm_log_needs_no_folder_that_only_the_job_would_create():
    """SLURM opens --output when the job starts, before the script runs: it must name a file in an existing folder."""
    with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
        (output,) = [line.split("=", 1)[1] for line in f if line.startswith("#SBATCH --output=")]
    assert "/" not in output.strip()
