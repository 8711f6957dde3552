"""The workflow config, checked before any job runs: every key known, every value of its type, every name that
refers to an attribute, region, model, map method or job defined. All mistakes are reported together, each naming
its full key and, for a typo, the closest valid name:

    config key probe.n_bootstrapp is not known; did you mean probe.n_bootstrap?

The schema is workflow/schemas/config.schema.yaml. Sections the workflow owns (cohort, preprocess, project, ...)
are written out there with their defaults. Sections whose settings belong to a library stage (`x-settings`:
probe, fairness, discover, mitigate.inlp / avae, the autoencoders, report) take their keys and types from the
library's own declaration, read by `declared_settings` without importing it, so a setting and its default are
added in one place: the library. See the schema's header for the keywords.

Imports only the standard library, PyYAML and jsonschema (and pyarrow to read a Parquet manifest's header): the
Snakefile calls this at every parse.
"""

from __future__ import annotations

import copy
import csv
import difflib
import functools
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import jsonschema
import yaml

from cohortlens.declared_settings import declared_keys, declared_value
from cohortlens.types import ALL_REGIONS  # the map of all regions together (workflow/rules/common.smk MAP_REGIONS)

# PyYAML reads 1e-3 (no dot) as text, not as a number
_YAML_FLOAT_AS_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigValidationError(ValueError):
    """Every mistake of a config; `problems` has one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = f"{len(self.problems)} config mistake{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{count} (nothing was run):\n" + "\n".join(f"  - {p}" for p in self.problems))


class SchemaError(ValueError):
    """The schema itself contradicts the library (a developer's mistake, not the user's)."""


def check_config(config: Mapping, schema_path: str | Path) -> None:
    """Raise ConfigValidationError listing every mistake of `config` (a loaded workflow config); `config` is
    left as it is (Snakemake's validate fills in the defaults)."""
    problems = config_problems(config, schema_path)
    problems += [p for p in image_problems(config) if p not in problems]
    if problems:
        raise ConfigValidationError(problems)


def config_problems(config: Mapping, schema_path: str | Path) -> list[str]:
    schema = full_schema(str(schema_path))
    # the defaults are checked too: a default that names an attribute (mitigate.protected: [sex]) must exist
    filled = _with_defaults(copy.deepcopy(dict(config)), schema)
    validator = _validator_class(filled, schema)(schema)
    problems: list[str] = []
    errors = list(validator.iter_errors(filled))
    # an unknown model is one mistake, not also each of its keys that an imported model does not have
    unknown = [tuple(e.absolute_path) for e in errors if e.validator == "x-imported-model"]
    for error in errors:
        path = tuple(error.absolute_path)
        if error.validator != "x-imported-model" and any(path[:len(u)] == u for u in unknown):
            continue
        for line in _describe(error):
            if line not in problems:
                problems.append(line)
    return problems


# ------------------------------------------------------------------------------------------------ the schema


@functools.cache
def _full_schema(schema_path: str) -> dict:
    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    _complete(schema, "")
    return schema


def full_schema(schema_path: str | Path) -> dict:
    """The schema with every `x-settings` section's keys and every `x-enum` filled in from the library."""
    return copy.deepcopy(_full_schema(str(schema_path)))


def _complete(node: Any, where: str) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _complete(item, f"{where}/{i}")
        return
    if not isinstance(node, dict):
        return
    if "x-settings" in node:
        _add_library_keys(node, where)
    if "x-enum" in node:
        value = declared_value(node["x-enum"])
        if not isinstance(value, (list, tuple, dict)):
            raise SchemaError(f"schema {where}: x-enum {node['x-enum']} is not a literal list, tuple or dict")
        node["enum"] = list(value)  # a dict: its keys
    for key, value in node.items():
        if not key.startswith("x-"):
            _complete(value, f"{where}/{key}")


def _add_library_keys(section: dict, where: str) -> None:
    refs = section["x-settings"]
    refs = [refs] if isinstance(refs, str) else list(refs)
    declared: dict[str, dict] = {}
    for ref in refs:
        declared.update(declared_keys(ref))
    own = section.get("properties", {})
    # a constraint on a misspelt key would silently add a new key: one the library does not declare must say why
    stray = sorted(k for k, s in own.items() if k not in declared and "description" not in s)
    if stray:
        raise SchemaError(f"schema {where or '/'}: {stray} are declared by none of {refs} "
                          "(a key of the schema's own needs a description)")
    merged = {}
    for key in {**declared, **own}:
        extra = own.get(key, {})
        # an excluded key (`not: {}`) keeps only its exclusion, so it is reported once
        merged[key] = extra if "not" in extra else {**declared.get(key, {}), **extra}
    section["properties"] = merged
    section["additionalProperties"] = False


def _with_defaults(instance: Any, schema: Mapping) -> Any:
    """Schema defaults filled in where a key is missing (what Snakemake's validate does after this check)."""
    if not isinstance(instance, dict) or not isinstance(schema, Mapping):
        return instance
    for key, sub in schema.get("properties", {}).items():
        if not isinstance(sub, Mapping):
            continue
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _with_defaults(instance[key], sub)
    return instance


# ------------------------------------------------------------------------------------------------ names


def _known_names(kind: str, config: Mapping, schema: Mapping, section: Mapping) -> list[str] | None:
    """The names an `x-names` / `x-key-names` kind allows in this config; None when the config does not define
    them well enough to tell (that mistake is reported on its own)."""
    def keys(value):
        return list(value) if isinstance(value, dict) else None

    if kind == "attributes":
        return keys(config.get("attributes"))
    if kind == "models":
        return keys(config.get("models"))
    if kind == "map regions":
        regions = keys(config.get("regions"))
        return None if regions is None else [*regions, ALL_REGIONS]
    if kind == "map methods":
        methods = (config.get("project") or {}).get("methods")
        return list(methods) if isinstance(methods, list) else None
    if kind == "jobs":
        # any model the workflow knows, configured or not: resources left for a model switched off are harmless
        models = list(schema["properties"]["models"]["properties"])
        per_model = [f"{job}_{m}" for job in section.get("x-model-jobs", []) for m in models]
        archs = list(schema["properties"].get("baselines", {}).get("properties", {}))
        per_arch = [f"{job}_{a}" for job in section.get("x-arch-jobs", []) for a in archs]
        return list(dict.fromkeys([*section.get("x-jobs", []), *per_model, *per_arch]))
    raise SchemaError(f"x-names: unknown kind of name {kind!r}")


def _unknown_name(name: str, kind: str, known: list[str]) -> str:
    return f"{name!r} is not one of the {kind} ({', '.join(map(str, known)) or 'none'}){_did_you_mean(name, known)}"


def _validator_class(config: Mapping, schema: Mapping):
    """Draft 2020-12 plus `x-names` / `x-key-names`, checked against the names this config defines."""

    def names(validator, kind, instance, section) -> Iterator[jsonschema.ValidationError]:
        known = _known_names(kind, config, schema, section)
        if isinstance(instance, str) and known is not None and instance not in known:
            yield jsonschema.ValidationError(_unknown_name(instance, kind, known))

    def key_names(validator, kind, instance, section) -> Iterator[jsonschema.ValidationError]:
        known = _known_names(kind, config, schema, section)
        if isinstance(instance, dict) and known is not None:
            for key in instance:
                if key not in known:
                    yield jsonschema.ValidationError(_unknown_name(key, kind, known), path=(key,))

    def imported_model(validator, _, instance, section) -> Iterator[jsonschema.ValidationError]:
        # a model name that is neither pca nor an autoencoder must be an imported model: it has `embeddings`
        if isinstance(instance, dict) and "embeddings" not in instance:
            known = list(schema["properties"]["models"]["properties"])
            yield jsonschema.ValidationError(",".join(known))  # _describe writes the message

    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {
        "x-names": names, "x-key-names": key_names, "x-imported-model": imported_model})


# ------------------------------------------------------------------------------------------------ images


def image_models(config: Mapping) -> list[str]:
    """The configured models that read images: all but the imported ones (`embeddings: <file>`)."""
    models = config.get("models")
    if not isinstance(models, Mapping):
        return []
    return [m for m, c in models.items() if not (isinstance(c, Mapping) and "embeddings" in c)]


def manifest_columns(path: str | Path) -> list[str] | None:
    """The manifest's column names from its header (None: not there yet, or unreadable: the cohort stage says
    why). Parquet's schema is read with pyarrow, imported only for a Parquet manifest."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if path.suffix in (".csv", ".tsv", ".txt"):
            with path.open(encoding="utf-8", newline="") as handle:
                header = next(csv.reader(handle, delimiter="\t" if path.suffix == ".tsv" else ","), [])
            return [c.strip() for c in header]
    except Exception:  # not there yet (made by an upstream rule), unreadable: the cohort stage reports it
        return None
    return None


def image_problems(config: Mapping) -> list[str]:
    """Mistakes only the files tell: an imported model whose file format is unknown or that lacks its ids, and
    models that read images in a cohort whose manifest has no image column (an embeddings-only cohort)."""
    problems = []
    extensions = declared_value("cohortlens.embed.imported:EXTENSIONS")
    models = config.get("models") if isinstance(config.get("models"), Mapping) else {}
    for name, cfg in models.items():
        if not (isinstance(cfg, Mapping) and isinstance(cfg.get("embeddings"), str)):
            continue
        fmt = cfg.get("format") or extensions.get(Path(cfg["embeddings"]).suffix.lower())
        if fmt is None:
            problems.append(f"config key models.{name}.format is missing: the format of {cfg['embeddings']!r} is "
                            f"not known from its extension (one of {sorted(set(extensions.values()))})")
        elif fmt == "npy" and not cfg.get("ids"):
            problems.append(f"config key models.{name}.ids is missing: a .npy array holds no subject ids (a CSV or "
                            "Parquet file with subject_id, region per array row)")
    readers = image_models(config)
    manifest = (config.get("cohort") or {}).get("manifest") if isinstance(config.get("cohort"), Mapping) else None
    columns = manifest_columns(manifest) if readers and isinstance(manifest, str) else None
    if columns is not None and "image" not in columns:
        problems += [f"config key models.{m} reads images, but the manifest {manifest} has no image column (an "
                     "embeddings-only cohort takes only imported models: models.<name>.embeddings: <file>)"
                     for m in readers]
    return problems


# ------------------------------------------------------------------------------------------------ messages


def _key(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(name: Any, known, prefix: str = "") -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, [k for k in known if isinstance(k, str)], n=1, cutoff=0.6)
    return f"; did you mean {_join(prefix, close[0]) if prefix else close[0]}?" if close else ""


def _describe(error: jsonschema.ValidationError) -> list[str]:
    path = _key(error.absolute_path)
    where = f"config key {path}" if path else "the config"
    kind, expected = error.validator, error.validator_value
    if kind == "additionalProperties" and expected is False:
        known = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        extra = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        return [f"config key {_join(path, k)} is not known"
                + (_did_you_mean(k, known, path) or f" (known: {', '.join(known) or 'none'})") for k in extra]
    if kind == "required":
        return [f"config key {_join(path, k)} is missing" for k in expected if k not in error.instance]
    if kind == "not" and expected == {}:
        why = error.schema.get("description")
        return [f"config key {path} cannot be set here" + (f": {why}" if why else "")]
    if kind in ("x-names", "x-key-names"):
        return [f"{where}: {error.message}"]
    if kind == "x-imported-model":
        known, name = error.message.split(","), error.absolute_path[-1]
        hint = _did_you_mean(name, known, _key(list(error.absolute_path)[:-1]))
        return [f"{where} is not known" + (hint or f" (known: {', '.join(known)}; or an imported model: "
                                                   f"{path}.embeddings: <file>)")]
    if kind == "enum":
        return [f"{where} = {error.instance!r} is not one of {expected}{_did_you_mean(error.instance, expected)}"]
    if kind == "type":
        hint = ""
        if isinstance(error.instance, str) and _YAML_FLOAT_AS_TEXT.match(error.instance):
            hint = f" (YAML reads {error.instance} as text; write it with a dot, e.g. 1.0e-3)"
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        return [f"{where} = {error.instance!r} is not of type {wanted}{hint}"]
    return [f"{where}: {error.message}"]
