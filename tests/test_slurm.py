"""The workflow on a REAL single-node SLURM cluster (tests/slurm/cluster.sh: slurmctld, slurmd with 2 fake GPUs as
gres, slurmdbd + MariaDB, munge) through snakemake-executor-plugin-slurm with profiles/slurm plus the test layer
tests/slurm/profile. What is checked comes from sacct, i.e. from SLURM's own accounting, not from Snakemake:

- every job of the tiny demo ran as a SLURM job of this run and finished COMPLETED, the GPU rules (autoencoder
  training) with gres/gpu=1 and the CPU rules without;
- the outputs equal those of a local run of the same config (same seeds, same machine);
- `--forcerun <t-SNE rule>` submits only that rule and what depends on it, and a job SLURM requeues mid-run (as
  preemption does) runs again under its id while Snakemake waits for it;
- a job failing on a corrupt config is reported as FAILED with its log shown and its SLURM log kept, and with
  --keep-going the jobs that do not depend on it still complete.

Needs root (daemons, /etc/slurm, apt). Skipped, with the reason, only where the cluster cannot be set up at all
(not root, or Debian's packages not installable: cluster.sh exits 3); COHORTLENS_REQUIRE_SLURM=1 (CI) turns that skip
into a failure. Run alone: `tests/slurm/cluster.sh up && .venv/bin/pytest -m slurm` (docs/cluster.md).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, load_test_config

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
TEST_PROFILE = REPO / "tests" / "slurm" / "profile"
RUN_LIMIT_S = 480  # one snakemake run through SLURM (the full tiny demo takes about 3 min)
UPSTREAM = ("results/cohort", "results/preprocessed", "data/demo")  # upstream of every train/analysis stage
UPSTREAM_RULES = {"demo_cohort", "cohort", "preprocess_shard", "preprocess_index"}

# tiny settings for the autoencoders (keys of models/registry.py presets, training.TrainSettings, the model classes)
TINY_MODELS = {
    "vae": {"preset": "demo", "crop": 32, "channels": [8, 16], "latent_dim": 8, "batch_size": 8, "steps": 6,
            "warmup_steps": 2, "checkpoint_every": 3, "log_every": 3, "hessian_batch": 4, "progress_seconds": 0,
            "qa_images": 4},
    "dae": {"preset": "demo", "crop": 32, "latent_dim": 16, "batch_size": 8, "steps": 6,
            "checkpoint_every": 3, "log_every": 3, "progress_seconds": 0, "qa_images": 4, "ddim_steps": 4},
}
# what the training jobs ask SLURM for (config `resources`, read by the rules); gpu is left to the rules' default (1)
TINY_TRAIN_RESOURCES = {"cpus_per_gpu": 1, "threads": 1, "mem_mb": 2000, "runtime": 10}
SLURM_MODELS = tuple(os.environ.get("COHORTLENS_SLURM_MODELS", "vae").split(","))  # autoencoders run via SLURM
# the corrupt setting planted for one training job: a value the parse-time config check lets through (it checks
# keys and types) and the trainer rejects when the job starts, so exactly that job fails
BAD_VALUE = "bogus-slices"
# size of the tiny demo cohort (default: .test/config/tiny-demo.yaml's 24 subjects; the analysis stages cope with
# tiny regions, as tests/test_demo_workflow.py shows on the same config)
N_SUBJECTS = int(os.environ.get("COHORTLENS_SLURM_SUBJECTS", "0")) or None


# ---------------------------------------------------------------------------------------------------- helpers

@functools.cache
def rule_names() -> frozenset[str]:
    """The rules the workflow defines (with the demo config), as `snakemake --list-rules` lists them."""
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", workdir,
                               "--configfile", str(REPO / "config" / "config.yaml"), "--list-rules"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return frozenset(line.strip() for line in proc.stdout.splitlines() if re.fullmatch(r"\w+", line.strip()))


def autoencoders() -> list[str]:
    """The autoencoders of the SLURM run (when this checkout can train them): the GPU jobs. One autoencoder keeps
    the module's time in bounds: every model adds 8 SLURM jobs of ~15 s CPU each on the 2-CPU node."""
    rules = rule_names()
    if "train_autoencoder" in rules:
        return list(SLURM_MODELS)
    return [m for m in SLURM_MODELS if f"train_{m}" in rules]


def forcerun_rule() -> str:
    """The stage the rerun test forces: the t-SNE rule once it exists, else the pca training."""
    tsne = sorted(r for r in rule_names() if "tsne" in r)
    return "project_tsne" if "project_tsne" in tsne else (tsne[0] if tsne else "train_pca")


def tiny_demo_config() -> dict:
    """.test/config/tiny-demo.yaml (pca, the analysis stages at their cheapest) with N_SUBJECTS subjects in 2
    shards, every autoencoder tiny, and one CPU per job so that two jobs share the 2-CPU node."""
    cfg = load_test_config("tiny-demo")
    n_subjects = N_SUBJECTS or cfg["demo"]["n_subjects"]
    cfg["demo"].update(n_subjects=n_subjects, workers=1)
    cfg["preprocess"].update(subjects_per_shard=max(8, n_subjects * 2 // 3), threads=1)  # 2 shards
    resources = {name: {"threads": 1} for name in ("project", "probe", "mitigate")}
    for m in autoencoders():
        cfg["models"][m] = dict(TINY_MODELS[m])
        resources[f"train_{m}"] = dict(TINY_TRAIN_RESOURCES)
        resources[f"embed_{m}"] = {"threads": 1}
    cfg["resources"] = resources
    return cfg


def write_config(workdir: Path, cfg: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def slurm_cmd(workdir: Path, *args: str) -> list[str]:
    return [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"),
            "--profile", str(PROFILE), "--workflow-profile", str(TEST_PROFILE), *args]


def local_cmd(workdir: Path, *args: str) -> list[str]:
    return [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--profile", str(REPO / "profiles" / "local"),
            "--cores", "2", *args]


class Run:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.out = proc.stdout + proc.stderr
        m = re.search(r"SLURM run ID: (\S+)", self.out)
        self.run_id = m.group(1) if m else None

    def tail(self, n=6000) -> str:
        return f"rc={self.rc}\n{self.out[-n:]}"


def start_slurm(workdir: Path, *args: str) -> subprocess.Popen:
    """snakemake through SLURM in the background, under `timeout` (a job stuck PENDING must not hang the suite)."""
    cmd = ["timeout", "-k", "20", str(RUN_LIMIT_S), *slurm_cmd(workdir, *args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_slurm(proc: subprocess.Popen, check=True) -> Run:
    out, err = proc.communicate(timeout=RUN_LIMIT_S + 60)
    run = Run(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    if run.rc == 124 and run.run_id:  # timed out: take its jobs off the cluster
        subprocess.run(["scancel", "--name", run.run_id], capture_output=True)
    assert run.rc != 124, f"snakemake through SLURM timed out after {RUN_LIMIT_S} s\n{run.tail()}\n{squeue()}"
    if check:
        assert run.rc == 0, f"snakemake through SLURM failed\n{run.tail()}"
    assert run.run_id, f"no 'SLURM run ID' in snakemake's output: not the slurm executor?\n{run.tail()}"
    return run


def run_slurm(workdir: Path, *args: str, check=True) -> Run:
    return finish_slurm(start_slurm(workdir, *args), check=check)


def squeue() -> str:
    return subprocess.run(["squeue", "-l"], capture_output=True, text=True).stdout


def sacct(run_id: str) -> list[dict]:
    """The SLURM jobs of one snakemake run (the plugin names every job after the run's id and puts
    `rule_<rule>[_wildcards_<values>]` in the job comment)."""
    proc = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", run_id, "-S", "now-1days",
         "-o", "JobID,JobName%60,Comment%200,State,ExitCode,AllocTRES%200,ReqTRES%200"],
        capture_output=True, text=True, check=True,
    )
    rules = sorted(rule_names(), key=len, reverse=True)  # rule names may contain "_": match the longest
    jobs = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        jobid, name, comment, state, exit_code, alloc, req = line.split("|")
        rule = next((r for r in rules if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_")), None)
        assert rule, f"job {jobid} has no rule of the workflow in its comment: {line!r}"
        wildcards = comment[len(f"rule_{rule}_wildcards_"):] if comment != f"rule_{rule}" else None
        jobs.append({"id": int(jobid), "rule": rule, "wildcards": wildcards, "key": (rule, wildcards),
                     "state": state, "exit": exit_code, "tres": alloc, "req": req})
    return jobs


def finished_rules(run: Run) -> Counter:
    """Jobs Snakemake itself reports as finished (the target rule `all` runs no job and is left out)."""
    c = Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", run.out))
    c.pop("all", None)
    return c


def planned(workdir: Path, *args: str) -> list[dict]:
    """Dry run with the same profiles: one {rule, key, resources, input, output} per job it would submit."""
    proc = subprocess.run([*slurm_cmd(workdir, "-n", *args)], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n)", text):
        m = re.search(r"^(?:rule|checkpoint|localrule) (\w+):$", block, re.M)
        if not m or m.group(1) == "all":
            continue

        def field(name, block=block):
            f = re.search(rf"^\s+{name}: (.*)$", block, re.M)
            return f.group(1) if f else ""

        resources = dict(kv.split("=", 1) for kv in field("resources").split(", ") if "=" in kv)
        wildcards = [kv.split("=", 1)[1] for kv in field("wildcards").split(", ") if "=" in kv]
        jobs.append({"rule": m.group(1), "key": (m.group(1), "_".join(wildcards).replace("/", "_") or None),
                     "resources": resources, "input": [f for f in field("input").split(", ") if f],
                     "output": [f for f in field("output").split(", ") if f]})
    return jobs


def gpus_requested(resources: dict) -> int:
    if resources.get("gpu", "0") not in ("0", "<TBD>", "None"):
        return int(resources["gpu"])
    gres = re.fullmatch(r"gpu(?::\w+)?(?::(\d+))?", resources.get("gres", ""))
    return int(gres.group(1) or 1) if gres else 0


def tres_gpus(tres: str) -> int:
    m = re.search(r"gres/gpu=(\d+)", tres)
    return int(m.group(1)) if m else 0


def result_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for d in ("results", "data") for p in (root / d).rglob("*")
                  if p.is_file() and not str(p.relative_to(root)).startswith("results/logs/")
                  and "/checkpoints/" not in str(p.relative_to(root)))


def mtimes(root: Path, prefixes=UPSTREAM) -> dict[str, int]:
    return {f: (root / f).stat().st_mtime_ns for f in result_files(root) if f.startswith(prefixes)}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # copy2 keeps mtimes: Snakemake sees the same finished run
    shutil.rmtree(dst / "results/logs/slurm", ignore_errors=True)  # what is there afterwards is this run's
    return dst


def assert_same_outputs(a: Path, b: Path) -> None:
    """Two runs of one config give the same results: Parquet by content and metadata, model.pt by tensors, the
    training logs without their timing columns, HTML with Plotly's random div ids masked, everything else byte for
    byte. Not compared: results/logs (timestamps) and training checkpoints (model.pt holds the same tensors)."""
    import torch

    files = result_files(a)
    assert files == result_files(b), sorted(set(files) ^ set(result_files(b)))
    differ = []
    for f in files:
        fa, fb = a / f, b / f
        if f.endswith(".parquet"):
            same = (pl.read_parquet(fa).equals(pl.read_parquet(fb), null_equal=True)
                    and pq.read_schema(fa).metadata == pq.read_schema(fb).metadata)
        elif f.endswith(".pt"):
            # torch.save's zip names its folder after the file it writes: the atomic temp name, random per run
            same = _same_tree(torch.load(fa, weights_only=False), torch.load(fb, weights_only=False))
        elif f.endswith(".csv") and "elapsed_s" in fa.read_text().partition("\n")[0]:  # training logs
            same = pl.read_csv(fa).drop(TIMING, strict=False).equals(pl.read_csv(fb).drop(TIMING, strict=False))
        elif f.endswith(".html"):
            ta, tb = (UUID.sub("<uuid>", p.read_text()) for p in (fa, fb))  # Plotly names its <div> by uuid4
            same = ta == tb
            if not same and f == "results/report/index.html":
                # the report's quarantine-by-reason table lists tied counts in group_by order (not deterministic)
                ra, rb = (re.findall(r"<tr>.*?</tr>", t, re.S) for t in (ta, tb))
                same = sorted(ra) == sorted(rb) and len(ra) > 0
        else:
            same = fa.read_bytes() == fb.read_bytes()
        if not same:
            differ.append(f)
    assert not differ, f"outputs differ between the SLURM and the local run: {differ}"


TIMING = ["elapsed_s", "img_per_s"]  # wall-clock fields of training logs and model.pt's summary
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _same_tree(x, y) -> bool:
    import numpy as np
    import torch

    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_tree(x[k], y[k]) for k in x
                                                                      if k not in TIMING)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same_tree(i, j) for i, j in zip(x, y))
    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and np.array_equal(x, y)
    return x == y


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cluster(request):
    """The cluster of tests/slurm/cluster.sh, up; stopped at the end if this fixture was the one to start it."""
    required = os.environ.get("COHORTLENS_REQUIRE_SLURM") == "1"
    give_up = pytest.fail if required else pytest.skip
    if os.geteuid() != 0:
        give_up("needs root: tests/slurm/cluster.sh installs Debian's SLURM packages and starts the daemons")
    was_up = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    t0 = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode == 3:
        give_up(f"no SLURM cluster can be set up here: {up.stderr.strip().splitlines()[-1]}")
    assert up.returncode == 0, f"tests/slurm/cluster.sh up failed (rc {up.returncode}):\n{up.stdout}\n{up.stderr}"
    print(f"cluster up in {time.monotonic() - t0:.1f} s (already up: {was_up})")
    if not was_up:
        request.addfinalizer(lambda: subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True))
    return CLUSTER_SH


@pytest.fixture(scope="module")
def baseline(cluster, tmp_path_factory):
    """The tiny demo run through SLURM and, side by side (the SLURM run mostly waits for sacct polls), the same
    config run locally. Returns {slurm: workdir, run: Run, local: workdir, plan: jobs of the full DAG}."""
    cfg = tiny_demo_config()
    slurm_dir, local_dir = tmp_path_factory.mktemp("slurm_run"), tmp_path_factory.mktemp("local_run")
    write_config(slurm_dir, cfg)
    write_config(local_dir, cfg)
    t0 = time.monotonic()
    local = subprocess.Popen(["timeout", str(RUN_LIMIT_S), *local_cmd(local_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        run = run_slurm(slurm_dir)
    finally:
        local_out = local.communicate(timeout=RUN_LIMIT_S + 60)[0]
    print(f"tiny demo: SLURM run and local run side by side {time.monotonic() - t0:.0f} s")
    assert local.returncode == 0, f"local run failed:\n{local_out[-5000:]}"
    # the whole DAG: --forceall lists what precedes the cohort checkpoint, but not the shards it will decide on
    plan = [p for p in planned(slurm_dir, "--forceall") if p["rule"] in ("demo_cohort", "cohort")]
    plan += planned(slurm_dir, "--forcerun", "preprocess_shard")
    return {"slurm": slurm_dir, "run": run, "local": local_dir, "plan": plan}


class Requeuer(threading.Thread):
    """Plays SLURM preemption with PreemptMode=REQUEUE: once the first job of `rule` newer than `after` is RUNNING,
    `scontrol requeue` it (back to PENDING, same job id) and release it at once (a requeued job otherwise waits out
    a BeginTime delay)."""

    def __init__(self, rule: str, after: int, limit_s: float = RUN_LIMIT_S):
        super().__init__(daemon=True)
        self.rule, self.after, self.limit_s = rule, after, limit_s
        self.job_id: int | None = None
        self.error: str | None = None

    def run(self):
        end = time.monotonic() + self.limit_s
        pattern = re.compile(rf"rule_{self.rule}(_wildcards_.*)?")
        while time.monotonic() < end and self.job_id is None:
            out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                jobid, comment, state = line.split("|")
                if int(jobid) > self.after and pattern.fullmatch(comment) and state == "RUNNING":
                    time.sleep(1)  # let the job get into its work
                    req = subprocess.run(["scontrol", "requeue", jobid], capture_output=True, text=True)
                    if req.returncode:
                        self.error = f"scontrol requeue {jobid}: {req.stderr}"
                        return
                    self.job_id = int(jobid)
                    break
            time.sleep(0.3)
        while self.job_id is not None and time.monotonic() < end:
            state = subprocess.run(["squeue", "-h", "-j", str(self.job_id), "-o", "%T"], capture_output=True,
                                   text=True).stdout.strip()
            if state == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={self.job_id}", "StartTime=now"], capture_output=True)
                return
            time.sleep(0.3)


@pytest.fixture(scope="module")
def reruns(baseline, tmp_path_factory):
    """Two runs on copies of the baseline, started together (each mostly waits for sacct polls, and their jobs
    share the node as two users' jobs would):
    - rerun: `--forcerun <t-SNE stage>`, during which the first of the forced stage's jobs is requeued once (as
      preemption does);
    - failing: `--keep-going` with a corrupt config for ONE job: the first autoencoder's model config names a
      slice selection that does not exist (valid for the schema; its training job fails at once), while
      `--forcerun probe` makes the other models' probes, and the fairness jobs after them, run again beside it."""
    rule = forcerun_rule()
    rerun_dir = copy_run(baseline["slurm"], tmp_path_factory.mktemp("rerun") / "run")
    rerun = {"workdir": rerun_dir, "rule": rule, "plan": planned(rerun_dir, "--forcerun", rule),
             "upstream": mtimes(rerun_dir)}
    models = autoencoders()
    failing = None
    if models:  # else no job whose failure leaves a branch to finish
        fail_dir = copy_run(baseline["slurm"], tmp_path_factory.mktemp("failing") / "run")
        cfg = yaml.safe_load((fail_dir / "config.yaml").read_text())
        bad_model = models[0]
        cfg["models"][bad_model]["train_slices"] = BAD_VALUE
        write_config(fail_dir, cfg)
        bad_rule = "train_autoencoder" if "train_autoencoder" in rule_names() else f"train_{bad_model}"
        force = ["--keep-going", "--forcerun", "probe" if "probe" in rule_names() else "train_pca"]
        failing = {"workdir": fail_dir, "bad_model": bad_model, "force": force,
                   "bad_key": (bad_rule, bad_model if bad_rule == "train_autoencoder" else None),
                   "plan": planned(fail_dir, *force)}
    before, started = last_job_id(), time.time()
    requeuer = Requeuer(rule, before)
    requeuer.start()
    t0 = time.monotonic()
    rerun_proc = start_slurm(rerun_dir, "--forcerun", rule)
    fail_proc = start_slurm(failing["workdir"], *failing["force"]) if failing else None
    try:
        rerun["run"] = finish_slurm(rerun_proc)
    finally:
        fail_run = finish_slurm(fail_proc, check=False) if fail_proc else None
    print(f"rerun of {rule} and --keep-going run with a failing job through SLURM: {time.monotonic() - t0:.0f} s")
    requeuer.join(timeout=5)
    rerun.update(before=before, jobs=sacct(rerun["run"].run_id), requeued=requeuer.job_id,
                 requeue_error=requeuer.error)
    if failing:
        failing.update(before=before, started=started, run=fail_run, jobs=sacct(fail_run.run_id))
    return {"rerun": rerun, "failing": failing}


@pytest.fixture(scope="module")
def rerun(reruns):
    return reruns["rerun"]


@pytest.fixture(scope="module")
def failing(reruns):
    if reruns["failing"] is None:
        pytest.skip("no autoencoder train rule in this checkout: no job whose failure leaves a branch to finish")
    return reruns["failing"]


def last_job_id() -> int:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-1days", "-o", "JobID"], capture_output=True,
                         text=True, check=True).stdout.split()
    return max((int(j) for j in out if j.isdigit()), default=0)


# ---------------------------------------------------------------------------------------------------- tests

def test_every_job_ran_as_a_completed_slurm_job(baseline):
    workdir, run = baseline["slurm"], baseline["run"]
    jobs = sacct(run.run_id)
    assert jobs, f"sacct knows no job named {run.run_id}"
    not_done = [j for j in jobs if j["state"] != "COMPLETED" or j["exit"] != "0:0"]
    assert not not_done, not_done
    submitted = Counter(j["key"] for j in jobs)
    # sacct, Snakemake's log and the dry run agree job by job, and every rule of the workflow (but `all`) ran
    assert submitted == Counter(p["key"] for p in baseline["plan"]), submitted
    assert Counter(j["rule"] for j in jobs) == finished_rules(run), finished_rules(run)
    # ...and that DAG holds every stage of the workflow (but those the tiny config leaves out, and `archive`, which
    # is not part of `all`)
    stages = {"demo_cohort", "cohort", "preprocess_shard", "preprocess_index", "train_pca", "train_autoencoder",
              "embed_pca", "embed_autoencoder", "project_tsne", "plot_projection", "probe", "fairness", "discover",
              "mitigate", "report", "publication_report"} & rule_names()
    assert stages <= {j["rule"] for j in jobs}, stages - {j["rule"] for j in jobs}
    shards = pl.read_parquet(workdir / "results/cohort/images.parquet")["shard"].n_unique()
    assert shards == 2 and sorted(j["wildcards"] for j in jobs if j["rule"] == "preprocess_shard") == ["0", "1"]
    assert (workdir / "results/report/index.html").stat().st_size > 0
    # the test profile restates default-resources: partition and memory reached sbatch
    assert all("mem=" in j["tres"] for j in jobs)


def test_training_jobs_got_one_gpu_and_cpu_jobs_none(baseline):
    """gres/gpu in SLURM's accounting (AllocTRES, else ReqTRES) equals what each job asked for; the autoencoder
    training jobs ask for exactly one GPU (the rules' default, config `resources.train_<model>.gpu`)."""
    wanted = {p["key"]: gpus_requested(p["resources"]) for p in baseline["plan"]}
    train = {k: g for k, g in wanted.items() if k[0] == "train_autoencoder" or k[0] in {f"train_{m}" for m in
                                                                                          autoencoders()}}
    assert len(train) == len(autoencoders()), (train, autoencoders())
    assert all(g == 1 for g in train.values()), train
    assert wanted[("train_pca", None)] == 0
    got = {j["key"]: tres_gpus(j["tres"]) or tres_gpus(j["req"]) for j in sacct(baseline["run"].run_id)}
    assert got == wanted, {k: (got.get(k), wanted.get(k)) for k in set(got) | set(wanted) if got.get(k) != wanted.get(k)}


def test_outputs_equal_a_local_run_of_the_same_config(baseline):
    assert_same_outputs(baseline["slurm"], baseline["local"])


def test_forcerun_resubmits_only_that_stage_and_what_follows(rerun, baseline):
    rule, jobs, workdir = rerun["rule"], rerun["jobs"], rerun["workdir"]
    submitted = Counter(j["key"] for j in jobs)
    assert submitted == Counter(p["key"] for p in rerun["plan"]), (submitted, rerun["plan"])  # the dry run's plan
    forced = [p for p in baseline["plan"] if p["rule"] == rule]
    assert Counter(j["rule"] for j in jobs)[rule] == len(forced) > 0
    # what follows the forced stage: every job that (transitively) reads its outputs; nothing else
    produced = {f for p in forced for f in p["output"]}
    dependants: set = set()
    changed = True
    while changed:
        changed = False
        for p in baseline["plan"]:
            if p["key"] not in dependants and p["rule"] != rule and produced & set(p["input"]):
                dependants.add(p["key"])
                produced |= set(p["output"])
                changed = True
    assert set(submitted) == {p["key"] for p in forced} | dependants, set(submitted) ^ ({p["key"] for p in forced}
                                                                                          | dependants)
    assert not {j["rule"] for j in jobs} & UPSTREAM_RULES, submitted
    assert all(j["id"] > rerun["before"] for j in jobs), jobs  # new jobs only
    assert all(j["state"] == "COMPLETED" and j["exit"] == "0:0" for j in jobs), jobs
    assert mtimes(workdir) == rerun["upstream"]  # demo images, cohort tables, shards: untouched
    for f in {f for p in forced for f in p["output"]}:  # the forced stage really ran again
        assert (workdir / f).stat().st_mtime_ns > (baseline["slurm"] / f).stat().st_mtime_ns, f
    assert_same_outputs(workdir, baseline["local"])  # and came to the same results


def test_a_requeued_job_is_waited_for_and_completes(rerun):
    """slurm-requeue: true -- a preempted/requeued job keeps its id, runs again, and Snakemake waits for it."""
    assert rerun["requeue_error"] is None, rerun["requeue_error"]
    job_id = rerun["requeued"]
    assert job_id, f"no {rerun['rule']} job was seen RUNNING to requeue it\n{rerun['run'].tail()}"
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", str(job_id), "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history
    # not resubmitted by Snakemake: SLURM reran the same job, and Snakemake counted it once
    assert Counter(j["key"] for j in rerun["jobs"]) == Counter(p["key"] for p in rerun["plan"])
    assert job_id in {j["id"] for j in rerun["jobs"]}


def test_a_failing_job_is_reported_with_its_log_and_keep_going_finishes_the_rest(failing):
    workdir, run, bad_key = failing["workdir"], failing["run"], failing["bad_key"]
    assert run.rc != 0, f"the run should fail\n{run.tail()}"
    jobs = failing["jobs"]
    assert all(j["id"] > failing["before"] for j in jobs)
    bad = [j for j in jobs if j["key"] == bad_key]
    assert len(bad) == 1 and bad[0]["state"] == "FAILED" and bad[0]["exit"] == "1:0", (bad, jobs)
    bad_id = bad[0]["id"]
    # every other job that was planned and does not depend on the failed one completed, and they include jobs
    # submitted after the failure was known (what --keep-going is for)
    others = [j for j in jobs if j["key"] != bad_key]
    assert others and all(j["state"] == "COMPLETED" and j["exit"] == "0:0" for j in others), jobs
    assert any(j["id"] > bad_id for j in others), f"no job was submitted after the failure: {jobs}"
    planned_keys = {p["key"] for p in failing["plan"]}
    not_run = planned_keys - {j["key"] for j in jobs}
    assert not_run, "every planned job ran, though one of them failed"
    # what did not run: the failed job's dependants (the bad model's jobs and the report) only
    assert all(failing["bad_model"] in (k[1] or "").split("_") or k[0] in ("report", "publication_report")
               for k in not_run), not_run
    # reported as failed: the rule, the SLURM job, and the rule's own log printed (show-failed-logs)
    assert f"Error in rule {bad_key[0]}" in run.out, run.tail()
    assert f"SLURM-job '{bad_id}' failed" in run.out, run.tail()
    rule_logs = [p for p in (workdir / "results/logs").rglob("*.log") if "slurm" not in p.parts
                 and p.stat().st_mtime >= failing["started"]]
    bad_logs = [p for p in rule_logs if BAD_VALUE in p.read_text()]
    assert bad_logs, f"no rule log names the corrupt setting: {rule_logs}"
    last = bad_logs[0].read_text().strip().splitlines()[-1]
    assert last in run.out, (last, run.tail())
    # its SLURM log is kept; those of the successful jobs are removed (slurm-keep-successful-logs: false)
    slurm_logs = workdir / "results/logs/slurm"
    kept = sorted(p.relative_to(slurm_logs).as_posix() for p in slurm_logs.rglob("*.log"))
    assert len(kept) == 1 and kept[0].startswith(f"rule_{bad_key[0]}/") and kept[0].endswith(f"{bad_id}.log"), kept
