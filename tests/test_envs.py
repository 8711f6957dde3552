"""The conda environments in envs/ stay in step with pyproject.toml, and every rule's `conda:` names one that exists.

Offline checks only: CI cannot reach conda channels (nor has conda), so the environments are never built here;
what is checked is what can drift silently — a pin changed in pyproject.toml but not in envs/, a rule pointing at a
renamed env file. Rules are read from the loaded workflow (Snakemake's API; `snakemake --list-conda-envs` needs a
conda executable).
"""

from __future__ import annotations

import functools
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO

ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
CPU_ENV, GPU_ENV = REPO / "envs" / "cohortlens.yaml", REPO / "envs" / "cohortlens-gpu.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
BASE = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["dependencies"]}
EXTRAS = {canonicalize_name(Requirement(r).name): Requirement(r)
          for reqs in PYPROJECT.get("optional-dependencies", {}).values() for r in reqs}
KNOWN = {**EXTRAS, **BASE}


def load_env(path: Path) -> dict:
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict) and isinstance(env.get("dependencies"), list), f"{path.name}: no dependencies list"
    return env


def pip_requirements(env: dict) -> tuple[dict[str, Requirement], list[str]]:
    """(name -> Requirement, editable/local installs) of the env's `pip:` section."""
    reqs, local = {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            for line in dep["pip"]:
                if line.startswith(("--index-url ", "--extra-index-url ", "--find-links ")):
                    continue  # where pip looks, not what it installs
                if line.startswith(("-e ", "--editable ", ".", "/")):
                    local.append(line.split(None, 1)[-1] if line.startswith("-") else line)
                else:
                    req = Requirement(line)
                    reqs[canonicalize_name(req.name)] = req
    return reqs, local


def conda_python(env: dict) -> str | None:
    for dep in env["dependencies"]:
        if isinstance(dep, str) and dep.split("=")[0].split(">")[0].split("<")[0].strip() == "python":
            return dep[len("python"):].lstrip("=")
    return None


def test_there_are_env_files():
    assert CPU_ENV in ENV_FILES and GPU_ENV in ENV_FILES, ENV_FILES


def test_the_gpu_env_is_the_cpu_env_plus_the_gpu_extra():
    cpu, _ = pip_requirements(load_env(CPU_ENV))
    gpu, local = pip_requirements(load_env(GPU_ENV))
    extra = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["optional-dependencies"]["gpu"]}
    assert extra and extra <= set(gpu), f"{GPU_ENV.name} lacks the gpu extra {sorted(extra - set(gpu))}"
    assert {n: str(r) for n, r in gpu.items() if n not in extra} == {n: str(r) for n, r in cpu.items()}
    assert local, f"{GPU_ENV.name} does not install the project itself"
    assert conda_python(load_env(GPU_ENV)) == conda_python(load_env(CPU_ENV))


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_parses_and_its_pins_equal_pyproject(path):
    env = load_env(path)
    assert env.get("channels"), f"{path.name}: no channels"
    reqs, local = pip_requirements(env)
    mismatched = {name: (str(req.specifier), str(KNOWN[name].specifier))
                  for name, req in reqs.items() if name in KNOWN and req.specifier != KNOWN[name].specifier}
    assert not mismatched, f"{path.name}: env pin vs pyproject.toml: {mismatched}"
    for target in local:  # `-e ../` installs the project itself: it must be the checkout with pyproject.toml
        assert (path.parent / target / "pyproject.toml").is_file(), f"{path.name}: {target} is not the project"
    python = conda_python(env)
    assert python, f"{path.name}: no python version"
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python + ".0" if python.count(".") == 1 else python), \
        f"{path.name}: python={python} outside requires-python {PYPROJECT['requires-python']}"


@functools.cache
def rules_with_conda() -> list[tuple[str, str, Path, object]]:
    """(rule, conda directive, the .smk file, its `gpu` resource) for every rule of the loaded workflow (demo config: all rules)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with tempfile.TemporaryDirectory() as workdir, SnakemakeApi() as api:
        wf = api.workflow(resource_settings=ResourceSettings(),
                          config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"]),
                          snakefile=REPO / "Snakefile", workdir=Path(workdir))
        return [(r.name, r.conda_env, Path(r.snakefile), _gpu(r.resources)) for r in wf._workflow.rules if not r.norun]


def _gpu(resources) -> object:
    """The rule's `gpu` resource: 0 when absent, else its value (a function when it depends on the job/config)."""
    if "gpu" not in resources:
        return 0
    res = resources["gpu"]
    if getattr(res, "is_evaluable", lambda: False)():
        return lambda *args: None  # evaluated per job
    return getattr(res, "value", res)


@pytest.mark.slow
def test_every_rule_names_an_existing_env_file():
    rules = rules_with_conda()
    assert {"cohort", "preprocess_shard", "train_pca", "report"} <= {name for name, *_ in rules}
    problems = []
    for name, env, smk, _ in rules:
        if not env:
            problems.append(f"{name}: no conda directive")
            continue
        path = (smk.parent / str(env)).resolve()  # relative to the .smk file that declares the rule
        if not (path.is_file() and path.parent == REPO / "envs"):
            problems.append(f"{name}: conda: {env} -> {path} is not a file in envs/")
    assert not problems, problems


@pytest.mark.slow
def test_the_rules_env_holds_every_runtime_dependency():
    used = {(smk.parent / str(env)).resolve() for _, env, smk, _ in rules_with_conda() if env}
    for path in used:
        reqs, local = pip_requirements(load_env(path))
        missing = sorted(set(BASE) - set(reqs))
        assert not missing, f"{path.name} lacks pyproject dependencies: {missing}"
        assert local, f"{path.name} does not install the project itself (-e ../): the rules' scripts import it"


def test_rules_that_can_get_a_gpu_use_the_gpu_env():
    """A rule with a `gpu` resource (its value comes from config, possibly per model) runs in the env with CUDA
    torch and cuML, so that a cluster user who gives it a GPU does not also have to switch its environment."""
    gpu_rules = [(name, env, smk) for name, env, smk, gpu in rules_with_conda() if callable(gpu) or gpu]
    wrong = [f"{name}: conda: {env}" for name, env, smk in gpu_rules
             if not env or (smk.parent / str(env)).resolve() != GPU_ENV]
    assert not wrong, f"rules with a gpu resource not in envs/{GPU_ENV.name}: {wrong}"
