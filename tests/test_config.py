"""The config check: every mistake stops the run before any job, naming its key (and the closest valid name)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cohortlens.config import ConfigValidationError, SchemaError, check_config, config_problems, full_schema
from cohortlens.declared_settings import declared_keys, declared_value

from conftest import REPO, demo_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def problems_of(cfg: dict) -> list[str]:
    return config_problems(cfg, SCHEMA)


def one_problem(cfg: dict) -> str:
    found = problems_of(cfg)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def cfg() -> dict:
    return copy.deepcopy(demo_config())


# ------------------------------------------------------------------------------------------------ clean configs


SHIPPED = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "config").rglob("*.yaml"), *(REPO / ".test").rglob("*.yaml")])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_clean(name):
    """Every config the repository ships or the suite runs (config/, .test/config/) passes the check."""
    assert len(SHIPPED) >= 5
    check_config(yaml.safe_load((REPO / name).read_text()), SCHEMA)


def test_snakemake_validate_still_fills_the_schema_defaults(cfg):
    from snakemake.utils import validate

    del cfg["report"]
    validate(cfg, str(SCHEMA))
    assert cfg["report"]["title"] == "cohortlens report"
    assert cfg["project"]["plots"]["engine"] == "matplotlib"


# ------------------------------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key(cfg):
    cfg["probes"] = {"n_bootstrap": 10}
    assert one_problem(cfg) == "config key probes is not known; did you mean probe?"


@pytest.mark.parametrize("section, typo, meant", [
    ("probe", "n_bootstrapp", "n_bootstrap"),
    ("probe", "cv_fold", "cv_folds"),
    ("fairness", "min_group_sise", "min_group_size"),
    ("discover", "alpah", "alpha"),
    ("mitigate", "method", "methods"),
    ("report", "max_pointz", "max_points"),
])
def test_unknown_key_in_a_section(cfg, section, typo, meant):
    cfg.setdefault(section, {})[typo] = 1
    assert one_problem(cfg) == f"config key {section}.{typo} is not known; did you mean {section}.{meant}?"


@pytest.mark.parametrize("path, typo, meant", [
    (("mitigate", "inlp"), "n_iteration", "n_iterations"),
    (("mitigate", "avae"), "latnet_dim", "latent_dim"),
    (("models", "vae"), "hessian_wieght", "hessian_weight"),  # a key of the model (BetaVAE)
    (("models", "vae"), "checkpoint_evry", "checkpoint_every"),  # a key of the trainer (TrainSettings)
    (("models", "dae"), "base_channel", "base_channels"),  # a key of the model (dae.DEFAULT_CONFIG)
    (("cohort", "split"), "stratiffy", "stratify"),
    (("resources", "train_vae"), "mem", "mem_mb"),
    (("baselines", "resnet10"), "wieght_decays", "weight_decays"),  # a key of the protocol (BaselineSettings)
    (("baselines", "densenet121"), "epoch", "epochs"),  # a key of the engine (SupervisedSettings)
    (("resources", "baseline_resnet34"), "threds", "threads"),
])
def test_unknown_nested_key(cfg, path, typo, meant):
    section = cfg
    for part in path:
        section = section.setdefault(part, {})
    section[typo] = 1
    key = ".".join(path)
    assert one_problem(cfg) == f"config key {key}.{typo} is not known; did you mean {key}.{meant}?"


def test_unknown_key_without_a_close_name_lists_the_known_ones(cfg):
    cfg["discover"]["zzz"] = 1
    problem = one_problem(cfg)
    assert problem.startswith("config key discover.zzz is not known (known: alpha, seed,")


def test_unknown_model(cfg):
    cfg["models"]["vea"] = {"preset": "demo"}
    assert one_problem(cfg) == "config key models.vea is not known; did you mean models.vae?"


def test_unknown_baseline_architecture(cfg):
    cfg["baselines"]["resnet18"] = {"preset": "demo"}
    assert one_problem(cfg) == "config key baselines.resnet18 is not known; did you mean baselines.resnet10?"


def test_unknown_baseline_preset(cfg):
    cfg["baselines"]["resnet34"]["preset"] = "nak"
    problem = one_problem(cfg)
    assert problem.startswith("config key baselines.resnet34.preset = 'nak' is not one of [")
    assert problem.endswith("did you mean nako?")


def test_unknown_preset(cfg):
    cfg["models"]["dae"]["preset"] = "dmeo"
    problem = one_problem(cfg)
    assert problem.startswith("config key models.dae.preset = 'dmeo' is not one of [")
    assert problem.endswith("did you mean demo?")


@pytest.mark.parametrize("path, key, why", [
    (("models", "vae"), "image_size", "set crop"),
    (("mitigate", "inlp"), "seed", "set mitigate.seed"),
    (("baselines", "resnet10"), "weight_decay", "set weight_decays"),
])
def test_key_set_elsewhere(cfg, path, key, why):
    section = cfg
    for part in path:
        section = section.setdefault(part, {})
    section[key] = 1
    problem = one_problem(cfg)
    assert problem.startswith(f"config key {'.'.join(path)}.{key} cannot be set here") and why in problem


# ------------------------------------------------------------------------------------------------ names


def _set(cfg: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        cfg = cfg.setdefault(part, {})
    cfg[path[-1]] = value


@pytest.mark.parametrize("path, value, key", [
    (("mitigate", "protected"), ["sex", "heigth"], "mitigate.protected[1]"),
    (("mitigate", "targets"), ["heigth"], "mitigate.targets[0]"),
    (("fairness", "targets"), ["heigth"], "fairness.targets[0]"),
    (("fairness", "protected"), ["age", "heigth"], "fairness.protected[1]"),
    (("fairness", "bins"), {"heigth": 3}, "fairness.bins.heigth"),
    (("fairness", "positive"), {"heigth": "tall"}, "fairness.positive.heigth"),
    (("cohort", "split", "stratify"), ["heigth"], "cohort.split.stratify[0]"),
    (("baselines", "resnet10", "attributes"), ["sex", "heigth"], "baselines.resnet10.attributes[1]"),
])
def test_unknown_attribute(cfg, path, value, key):
    _set(cfg, path, value)
    problem = one_problem(cfg)
    assert problem.startswith(f"config key {key}: 'heigth' is not one of the attributes (")
    assert problem.endswith("did you mean height?")


def test_a_default_naming_a_missing_attribute(cfg):
    """mitigate.protected defaults to [sex]: a cohort without sex must set it, and is told so before any job."""
    del cfg["mitigate"]
    cfg["attributes"]["gender"] = cfg["attributes"].pop("sex")
    cfg["cohort"]["split"]["stratify"] = ["age"]
    cfg["fairness"]["targets"] = ["gender"]
    assert one_problem(cfg).startswith("config key mitigate.protected[0]: 'sex' is not one of the attributes")


@pytest.mark.parametrize("path, value, expected", [
    (("mitigate", "models"), ["vea"], "config key mitigate.models[0]: 'vea' is not one of the models (pca, vae, dae); "
                                      "did you mean vae?"),
    (("report", "interactive_regions"), ["all", "nek"], "config key report.interactive_regions[1]: 'nek' is not one "
                                                        "of the map regions (neck, chest, lumbar, all); did you mean "
                                                        "neck?"),
    (("resources", "train_vea"), {"gpu": 1}, "config key resources.train_vea: 'train_vea' is not one of the jobs ("),
    (("resources", "baseline_resnet18"), {"gpu": 1}, "config key resources.baseline_resnet18: 'baseline_resnet18' is "
                                                      "not one of the jobs ("),
])
def test_other_names(cfg, path, value, expected):
    _set(cfg, path, value)
    assert one_problem(cfg).startswith(expected)


def test_interactive_method_must_be_a_map_method(cfg):
    cfg["project"]["methods"] = ["tsne"]
    cfg["report"]["interactive_methods"] = ["umap"]
    assert one_problem(cfg) == "config key report.interactive_methods[0]: 'umap' is not one of the map methods (tsne)"


# ------------------------------------------------------------------------------------------------ types and values


@pytest.mark.parametrize("path, value, expected", [
    (("preprocess", "threads"), 0, "config key preprocess.threads: 0 is less than the minimum of 1"),
    (("probe", "n_bootstrap"), "many", "config key probe.n_bootstrap = 'many' is not of type integer"),
    (("probe", "cv_folds"), 1, "config key probe.cv_folds: 1 is less than the minimum of 2"),
    (("models", "vae", "lr"), "1e-3", "config key models.vae.lr = '1e-3' is not of type number (YAML reads 1e-3 as "
                                      "text; write it with a dot, e.g. 1.0e-3)"),
    (("fairness", "alpha"), 1.5, "config key fairness.alpha: 1.5 is greater than or equal to the maximum of 1"),
    (("mitigate", "methods"), ["leac"], "config key mitigate.methods[0] = 'leac' is not one of ['leace', 'inlp', "
                                        "'avae']; did you mean leace?"),
    (("cohort",), {"split": {}}, "config key cohort.manifest is missing"),
    (("baselines", "resnet10", "heads"), "both", "config key baselines.resnet10.heads = 'both' is not one of "
                                                  "['separate', 'shared']"),
    (("baselines", "resnet10", "weight_decays"), [], "config key baselines.resnet10.weight_decays: [] should be "
                                                     "non-empty"),
    (("baselines", "resnet34", "lr"), "1e-3", "config key baselines.resnet34.lr = '1e-3' is not of type number (YAML "
                                              "reads 1e-3 as text; write it with a dot, e.g. 1.0e-3)"),
])
def test_wrong_type_or_value(cfg, path, value, expected):
    _set(cfg, path, value)
    assert one_problem(cfg) == expected


def test_every_mistake_is_reported_together(cfg):
    cfg["probe"]["n_bootstrapp"] = 10
    cfg["models"]["vae"]["hessian_wieght"] = 1e-6
    cfg["mitigate"]["protected"] = ["sexx"]
    cfg["preprocess"]["threads"] = "two"
    with pytest.raises(ConfigValidationError) as caught:
        check_config(cfg, SCHEMA)
    assert len(caught.value.problems) == 4
    text = str(caught.value)
    assert text.startswith("4 config mistakes (nothing was run):")
    for key in ("probe.n_bootstrapp", "models.vae.hessian_wieght", "mitigate.protected[0]", "preprocess.threads"):
        assert f"config key {key}" in text


def test_deterministic_is_a_trainer_key_of_models_and_baselines(cfg):
    cfg["models"]["vae"]["deterministic"] = True
    cfg.setdefault("baselines", {}).setdefault("resnet10", {"preset": "demo"})["deterministic"] = True
    assert problems_of(cfg) == []
    cfg["models"]["vae"]["determinstic"] = True
    assert "config key models.vae.determinstic" in one_problem(cfg) and "deterministic" in one_problem(cfg)



def test_compile_mode_is_checked_before_any_job(cfg):
    cfg["models"]["dae"]["compile_mode"] = "reduce-overhead"
    assert problems_of(cfg) == []
    cfg["models"]["dae"]["compile_mode"] = "fast"
    problem = one_problem(cfg)
    assert "models.dae.compile_mode" in problem and "reduce-overhead" in problem, problem

def test_the_check_does_not_change_the_config(cfg):
    del cfg["report"]
    before = copy.deepcopy(cfg)
    check_config(cfg, SCHEMA)
    assert cfg == before


# ------------------------------------------------------------------------------------------------ the real dry run


@pytest.mark.slow
def test_snakemake_dry_run_stops_on_a_typo(tmp_path, cfg):
    cfg["probe"]["n_bootstrapp"] = 10
    cfg["models"]["vae"]["hessian_wieght"] = 1e-6
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.run([snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--configfile", str(config), "--cores", "1", "-n"],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "config key probe.n_bootstrapp is not known; did you mean probe.n_bootstrap?" in out
    assert "config key models.vae.hessian_wieght is not known; did you mean models.vae.hessian_weight?" in out
    assert "Building DAG" not in out  # stopped while parsing, before any job was planned


# ------------------------------------------------------------------------------------------------ the schema itself


def test_resource_jobs_of_the_schema_are_those_the_rules_read():
    text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    jobs = set(re.findall(r'(?<![\w])res\("(\w+)"', text))
    model_jobs = set(re.findall(r'model_res\("(\w+)"', text))
    arch_jobs = set(re.findall(r'arch_res\("(\w+)"', text))
    resources = yaml.safe_load(SCHEMA.read_text())["properties"]["resources"]
    assert set(resources["x-jobs"]) == jobs
    assert set(resources["x-model-jobs"]) == model_jobs
    assert set(resources["x-arch-jobs"]) == arch_jobs == {"baseline"}


def test_models_of_the_schema_are_pca_and_the_registered_ones():
    models = yaml.safe_load(SCHEMA.read_text())["properties"]["models"]["properties"]
    assert set(models) == {"pca", *declared_value("cohortlens.models.registry:MODELS")}


def test_baseline_architectures_of_the_schema_are_the_engines_and_the_presets():
    archs = yaml.safe_load(SCHEMA.read_text())["properties"]["baselines"]["properties"]
    assert tuple(archs) == declared_value("cohortlens.models.supervised.networks:ARCHITECTURES")
    assert set(archs) == set(declared_value("cohortlens.analysis.baseline_settings:PRESETS"))


def test_a_schema_constraint_on_a_key_the_library_lacks_is_a_schema_error(tmp_path):
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump({"type": "object", "properties": {"discover": {
        "type": "object", "x-settings": "cohortlens.analysis.discover.core:CoreSettings",
        "properties": {"alpah": {"minimum": 0}}}}}))
    with pytest.raises(SchemaError, match="alpah"):
        full_schema(schema)


def test_library_sections_have_no_defaults_in_the_schema():
    """Their defaults live in the library only: Snakemake's validate must not fill in a second copy."""
    def defaults_under(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "default" and value not in ({}, None):
                    yield value
                yield from defaults_under(value)
        elif isinstance(node, list):
            for item in node:
                yield from defaults_under(item)

    def library_sections(node):
        if isinstance(node, dict):
            if "x-settings" in node:
                yield node
            for value in node.values():
                yield from library_sections(value)

    schema = yaml.safe_load(SCHEMA.read_text())
    sections = list(library_sections(schema))
    # probe, baselines x 3, fairness, discover, counterfactuals, finding_networks.curves / .saliency, mitigate.inlp,
    # mitigate.avae, vae, dae, report
    assert len(sections) == 14
    for section in sections:
        declared = {k for ref in ([section["x-settings"]] if isinstance(section["x-settings"], str)
                                  else section["x-settings"]) for k in declared_keys(ref)}
        for key, sub in section.get("properties", {}).items():
            if key in declared:
                assert not list(defaults_under(sub)), (section["x-settings"], key)


# ------------------------------------------------------------------------------------------------ the reading


def test_declarations_read_from_source_match_the_imported_settings():
    from cohortlens.analysis import fairness, probe_settings
    from cohortlens.analysis.counterfactuals import CounterfactualSettings
    from cohortlens.analysis.discover import settings as discover_settings
    from cohortlens.report import sections

    assert set(declared_keys("cohortlens.analysis.probe_settings:ProbeSettings")) == {
        f.name for f in dataclasses.fields(probe_settings.ProbeSettings)}
    assert set(declared_keys("cohortlens.analysis.fairness:FairnessSettings")) == {
        f.name for f in dataclasses.fields(fairness.FairnessSettings)}
    refs = yaml.safe_load(SCHEMA.read_text())["properties"]["discover"]["x-settings"]
    assert [ref.rpartition(":")[2] for ref in refs] == [c.__name__ for c in discover_settings.SETTINGS_CLASSES]
    for ref, cls in zip(refs, discover_settings.SETTINGS_CLASSES):
        assert set(declared_keys(ref)) == {f.name for f in dataclasses.fields(cls)}
    assert {k for ref in refs for k in declared_keys(ref)} == set(discover_settings.DEFAULTS)
    assert set(declared_keys("cohortlens.report.sections:DEFAULTS")) == set(sections.DEFAULTS)
    assert set(declared_keys("cohortlens.analysis.counterfactuals:CounterfactualSettings")) == {
        f.name for f in dataclasses.fields(CounterfactualSettings)}


def test_model_declarations_read_from_source_match_the_imported_ones():
    """Imports torch and MONAI (seconds): what the Snakefile avoids at every parse."""
    from cohortlens.analysis.mitigate import erase_inlp
    from cohortlens.embed.autoencoder import NORMALISATIONS
    from cohortlens.models import dae, registry, vae
    from cohortlens.models.adversarial_vae import AdversarialVAEConfig
    from cohortlens.models.training.settings import TrainSettings

    def with_default(fn):
        return {n for n, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty and n not in ("self", "threads")}

    assert set(declared_keys("cohortlens.models.training.settings:TrainSettings")) == {
        f.name for f in dataclasses.fields(TrainSettings)}
    assert set(declared_keys("cohortlens.models.vae:BetaVAE.__init__")) == with_default(vae.BetaVAE.__init__)
    assert set(declared_keys("cohortlens.models.dae:DEFAULT_CONFIG")) == set(dae.DEFAULT_CONFIG)
    assert set(declared_keys("cohortlens.analysis.mitigate:erase_inlp")) == with_default(erase_inlp)
    assert set(declared_keys("cohortlens.models.adversarial_vae:AdversarialVAEConfig")) == {
        f.name for f in dataclasses.fields(AdversarialVAEConfig)}
    for model in registry.MODELS:
        assert set(declared_value(f"cohortlens.models.registry:PRESETS.{model}")) == set(registry.PRESETS[model])
    from cohortlens.analysis import baseline_settings
    from cohortlens.models.supervised.settings import SupervisedSettings

    assert set(declared_keys("cohortlens.models.supervised.settings:SupervisedSettings")) == {
        f.name for f in dataclasses.fields(SupervisedSettings)}
    assert set(declared_keys("cohortlens.analysis.baseline_settings:BaselineSettings")) == {
        f.name for f in dataclasses.fields(baseline_settings.BaselineSettings)}
    assert declared_value("cohortlens.analysis.baseline_settings:PRESETS") == baseline_settings.PRESETS
    assert declared_value("cohortlens.embed.autoencoder:NORMALISATIONS") == NORMALISATIONS
    from cohortlens.analysis import finding_network_settings as fns

    for cls in (fns.CurveSettings, fns.SaliencySettings):
        assert set(declared_keys(f"cohortlens.analysis.finding_network_settings:{cls.__name__}")) == {
            f.name for f in dataclasses.fields(cls)}
    assert declared_value("cohortlens.analysis.finding_network_settings:PRESETS") == fns.PRESETS
    assert declared_value("cohortlens.analysis.finding_network_settings:SALIENCY_KINDS") == fns.SALIENCY_KINDS
