"""The report people read (issue 11, item 6): every finding as a sentence built from its row, units in the
tables, the model table's backend and test subjects, and a page whose maps and images carry no repetition
(docs/report.md). No demo run needed."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import polars as pl
import pytest

from cohortlens.report.headlines import conditioning, evidence, headline
from cohortlens.report.publication import suppress_small_counts
from cohortlens.report.units import (
    attribute_units,
    column_with_unit,
    groups_with_unit,
    unit_of,
    with_unit_column,
)


def _row(kind, attribute, value=None, effect=0.5, measure="r2", n=300, region="neck", p=0.005, details=None,
         sample_ids=(), explained_by=None):
    return {"finding_id": f"{kind}-{region}-{attribute}", "kind": kind, "region": region, "attribute": attribute,
            "value": value, "effect_size": effect, "effect_measure": measure, "p_value": p,
            "p_adjusted": None if p is None else 2 * p, "n": n, "sample_ids": list(sample_ids),
            "description": "the detector's sentence", "evidence": [], "details": json.dumps(details or {}),
            "explained_by": explained_by}


CLUSTER = _row("cluster", "site", "Essen", 3.34, "enrichment_ratio", n=88, p=1e-12,
               details={"method": "hdbscan", "size": 88, "share": 0.5114, "base_rate": 0.1533, "test": "fisher_exact",
                        "stability": 0.98, "survives_conditioning": ["age", "sex"]})

# one row per kind (and per shape of the leak and cluster kinds), with the sentence it must give
HEADLINES = [
    (_row("attribute_leak", "sex", "F", 0.4734, "balanced_accuracy_minus_chance", region="chest",
          details={"balanced_accuracy": 0.9734, "chance": 0.5, "auc": {"F": 0.99, "M": 0.99}}),
     "Sex is recognisable in the chest images (balanced accuracy 0.97, chance 0.50)"),
    (_row("attribute_leak", "site", "Essen", 0.3486, "balanced_accuracy_minus_chance",
          details={"balanced_accuracy": 0.5486, "chance": 0.2, "auc": {"Berlin": 0.6, "Essen": 1.0, "Hamburg": 0.7}}),
     "Site is recognisable in the neck images (balanced accuracy 0.55, chance 0.20; best recognised: Essen, AUC 1.00)"),
    (_row("attribute_leak", "age", None, 0.9606, details={"pearson_r": 0.98}),
     "Age is recognisable in the neck images (R² 0.96 of out-of-fold predictions, r = 0.98)"),
    (_row("attribute_leak", "date", None, 0.12, details={"pearson_r": 0.35, "p_without_stratum": {"site": {}}}),
     "Date is recognisable in the neck images beyond site (R² 0.12 of out-of-fold predictions, r = 0.35)"),
    (_row("attribute_leak", "site×date", "Neubrandenburg", 0.379, n=58,
          details={"scope": "within site", "shape": "step", "onset": "2015-05-27", "direction": "from",
                   "interval": ["2015-01-20", "2015-07-12"], "site": "Neubrandenburg"}),
     "Site Neubrandenburg's neck images changed from 2015-05-27 (95 % interval 2015-01-20 … 2015-07-12, 173 days): "
     "the date is recognisable within the site (R² 0.38)"),
    (_row("attribute_leak", "site×date", "Hamburg", 0.2, n=60,
          details={"scope": "within site", "shape": "drift", "onset": "2016-01-01", "site": "Hamburg"}),
     "Site Hamburg's neck images drift with the date, without a single onset (R² 0.20 within the site)"),
    (_row("attribute_leak", "site×date", "Essen", 0.05, details={"scope": "region", "stratum": "site"}),
     "The date is recognisable in the neck images only through site Essen (R² 0.05)"),
    (CLUSTER, "Site Essen is recognisable in the neck images: a cluster of 88 images, 51 % Essen vs 15 % overall"),
    (_row("cluster", "site", "Neubrandenburg", 2.6, "enrichment_ratio", n=58,
          details={"method": "knn_pocket", "size": 58, "share": 0.596, "base_rate": 0.228, "set_aside": ["Essen"]}),
     "Site Neubrandenburg is recognisable in the neck images: a neighbourhood pocket of 58 images, 60 % "
     "Neubrandenburg vs 23 % of the images outside site Essen, whose own pocket was found first"),
    (_row("cluster", "site×date", "Neubrandenburg, from 2015-05-27", 0.71, "rank_biserial", n=58,
          details={"method": "knn_pocket", "site": "Neubrandenburg", "onset": "2015-05-27", "direction": "from",
                   "share_inside": 0.97, "share_outside": 0.33, "n_inside": 34, "n_outside": 24}),
     "Site Neubrandenburg's neck images changed from 2015-05-27: 97 % of the 34 images in a neighbourhood pocket of "
     "the site vs 33 % of the 24 images outside it were acquired from that date"),
    (_row("discordant_subgroup", "sex", None, 0.04, "discordant_fraction", region="chest",
          details={"count": 12, "covariates": ["age", "height", "site=Essen", "site=Hamburg"]},
          sample_ids=[f"S{i:05d}/chest" for i in range(12)]),
     "12 of 300 chest images look like another sex than recorded, given age, height and site"),
    (_row("discordant_subgroup", "sex", "co-occurrence", 10.7, "observed_over_expected", region="all",
          details={"flagged": 18, "tested": 300, "multi_region_flagged": 7, "covariates": ["age", "weight"]}),
     "18 of 300 subjects look like another sex (7 subjects in ≥ 2 regions), beyond the classifiers' error given "
     "their age and weight"),
    (_row("outlier", "embedding", None, 1 / 300, "fraction_flagged", p=None, sample_ids=["S00173/neck"]),
     "1 of 300 neck images is an outlier of the embedding (isolated from its nearest neighbours)"),
    (_row("near_duplicate", "embedding", None, 2 / 300, "fraction_flagged", p=None,
          sample_ids=["S00148/neck", "S00162/neck"]),
     "2 of 300 neck images are near-duplicates (almost identical embeddings)"),
    (_row("label_issue", "diagnosis", None, 5 / 250, "fraction_flagged", n=250, p=None,
          sample_ids=[f"S{i:05d}/neck" for i in range(5)]),
     "5 of 250 neck images have a recorded diagnosis that disagrees with the embedding (cleanlab label issues)"),
    (_row("non_iid", "date", None, 0.3, "non_iid_ks", p=0.001, details={"given": ["site", "vendor"]}),
     "The neck embeddings drift with the date, given site and vendor"),
    (_row("non_iid", "site×date", "Mannheim", 0.3, "non_iid_ks", p=0.001),
     "The neck embeddings drift with the date within site Mannheim"),
]


@pytest.mark.parametrize("row, expected", HEADLINES, ids=[f"{r['kind']}-{r['attribute']}" for r, _ in HEADLINES])
def test_headline_of_every_kind(row, expected):
    text = headline(row)
    assert text == expected
    assert "<" not in text and ">" not in text  # plain text: the section escapes it


def test_headline_numbers_come_from_the_row():
    other = {**CLUSTER, "value": "Hamburg", "details": json.dumps({**json.loads(CLUSTER["details"]), "share": 0.42,
                                                                   "size": 61})}
    assert headline(other) == ("Site Hamburg is recognisable in the neck images: a cluster of 61 images, 42 % Hamburg "
                               "vs 15 % overall")
    leak = HEADLINES[0][0]
    wrong = {**leak, "details": json.dumps({"balanced_accuracy": 0.61, "chance": 0.5})}
    assert "balanced accuracy 0.61" in headline(wrong) and "0.97" not in headline(wrong)
    # a row of an unknown shape falls back to the detector's own sentence, without its p-values
    assert headline({"kind": "new_kind", "description": "something (p=0.01, FDR-adjusted 0.02)"}) == "something"


def test_evidence_and_conditioning():
    assert evidence(CLUSTER) == ("one-sided Fisher exact test of the cluster's members; cluster stability 0.98; "
                                 "p = 1.0e-12, FDR-adjusted 2.0e-12; effect: enrichment 3.3×; n = 88 images")
    assert conditioning(CLUSTER) == "Survives conditioning on age and sex"
    echo = _row("attribute_leak", "weight", None, 0.3, explained_by="site=Essen",
                details={"explained_by": {"attribute": "site", "value": "Essen", "p_conditional": 0.43,
                                          "inseparable": True}})
    assert conditioning(echo) == ("Explained by site Essen: given site, p = 0.43 (the two cannot be separated in "
                                  "this cohort)")
    outlier = HEADLINES[12][0]
    assert evidence(outlier).startswith("cleanlab Datalab flags (no test)") and "p =" not in evidence(outlier)


def test_publication_headlines_suppress_small_counts():
    """The counts of a headline are written in the forms the publication's text suppression recognises."""
    sub = HEADLINES[11][0]
    text = suppress_small_counts(headline(sub), 10)
    assert text.startswith("18 of 300 subjects") and "(< 10 subjects in ≥ 2 regions)" in text
    for row, _ in HEADLINES[12:15]:
        assert suppress_small_counts(headline(row), 10).startswith("< 10 of ")
    pocket = suppress_small_counts(headline(HEADLINES[9][0]), 40)
    assert "of the < 40 images in" in pocket and "of the < 40 images outside" in pocket


# ------------------------------------------------------------------------------------------------------ units

def test_units_from_the_config_with_defaults():
    attrs = {"age": {"type": "continuous"}, "weight": {"type": "continuous", "unit": "lb"},
             "bmi": {"type": "continuous", "unit": "kg/m²"}, "grip": {"type": "continuous"},
             "sex": {"type": "categorical"}, "exam": {"type": "date"}}
    units = attribute_units(attrs)
    assert units["age"] == "years" and units["weight"] == "lb" and units["height"] == "m"
    assert units["bmi"] == "kg/m²" and units["exam"] == "days" and "grip" not in units and "sex" not in units
    assert attribute_units(None) == {"age": "years", "weight": "kg", "height": "m", "date": "days"}
    assert unit_of("site×exam", units) == "days" and unit_of("sex", units) == ""
    assert column_with_unit("age MAE ↓", "years") == "age MAE (years) ↓"
    assert column_with_unit("sex balanced accuracy ↑", "") == "sex balanced accuracy ↑"


def test_unit_columns_of_the_tables():
    units = attribute_units(None)
    reprobe = pl.DataFrame({"attribute": ["age", "sex", "date"], "metric": ["mae", "balanced_accuracy", "mae"],
                            "value": [3.1, 0.9, 200.0]})
    out = with_unit_column(reprobe, "attribute", "metric", units)
    assert out.columns == ["attribute", "metric", "unit", "value"] and out["unit"].to_list() == ["years", "", "days"]
    groups = pl.DataFrame({"protected": ["age", "age", "site"], "group": ["< 34.3", "[34.3, 52.4)", "Essen"]})
    assert groups_with_unit(groups, "protected", ("group",), units)["group"].to_list() == [
        "< 34.3 years", "[34.3, 52.4) years", "Essen"]


# ---------------------------------------------------------------------------------------------- model table

def _metrics(rows):
    from cohortlens.analysis.probe import METRICS_SCHEMA

    base = {"kind": "classification", "metric": "balanced_accuracy", "ci_low": 0.5, "ci_high": 0.9, "n_train": 200,
            "n_test": 44, "chance": 0.5, "backend": "exact"}
    return pl.DataFrame([{**base, **r} for r in rows], schema=METRICS_SCHEMA)


def test_model_table_names_backend_test_subjects_and_units(tmp_path):
    from cohortlens.report.model_table import model_table_html, model_table_section

    rows = [{"model": "pca", "region": "neck", "attribute": "sex", "value": 0.91},
            {"model": "pca", "region": "neck", "attribute": "age", "kind": "regression", "metric": "mae",
             "value": 3.2, "ci_low": 2.5, "ci_high": 4.0},
            {"model": "vae", "region": "neck", "attribute": "sex", "value": 0.88, "backend": "approx", "n_test": 40}]
    frame = _metrics(rows)
    frame.write_parquet(tmp_path / "metrics.parquet")
    html = model_table_html(frame)
    assert "<th>test subjects</th>" in html and "<th>age MAE (years) ↓</th>" in html
    assert "<td>SVM (RBF, exact)</td><td>44</td>" in html and "<td>Nyström RBF + ridge</td><td>40</td>" in html
    # the distinct test subjects of the predictions; a range when attributes differ (a missing age)
    preds = pl.DataFrame({"model": "pca", "region": "neck",
                          "attribute": ["sex"] * 4 + ["age"] * 3 + ["sex"] * 2,
                          "subject_id": ["a", "b", "c", "d", "a", "b", "c", "e", "f"],
                          "split": ["test"] * 7 + ["val"] * 2})
    preds.write_parquet(tmp_path / "predictions.parquet")
    html = model_table_html(frame, predictions=[tmp_path / "predictions.parquet"])
    assert "<td>SVM (RBF, exact)</td><td>3–4</td>" in html
    section = model_table_section([tmp_path / "metrics.parquet"], predictions=[tmp_path / "predictions.parquet"])
    assert "Probes in this run: <b>SVM (RBF, exact), Nyström RBF + ridge</b>" in section
    assert "test subjects" in section and "distinct subjects of the test split" in section


# ---------------------------------------------------------------------------------------------- page size

def _projection_run(tmp_path, n=600):
    """subjects.parquet (attributes in its metadata) and t-SNE / UMAP projections of n images in 3 regions."""
    from cohortlens.io.tables import write_parquet

    rng = np.random.default_rng(0)
    n_subj = n // 3
    subjects = pl.DataFrame({"subject_id": [f"S{i:05d}" for i in range(n_subj)],
                             "sex": rng.choice(["F", "M"], n_subj).tolist(),
                             "age": rng.uniform(20, 80, n_subj).round(1),
                             "site": rng.choice(["A", "B", "C"], n_subj).tolist()})
    attrs = {"sex": {"type": "categorical", "role": "protected", "categories": ["F", "M"]},
             "age": {"type": "continuous", "role": "protected"},
             "site": {"type": "categorical", "role": "acquisition", "categories": ["A", "B", "C"]}}
    write_parquet(subjects, tmp_path / "subjects.parquet", {"attributes": attrs})
    rows = [(s, f"{s}/{r}", r) for s in subjects["subject_id"] for r in ("neck", "chest", "lumbar")]
    paths = []
    for method in ("tsne", "umap"):
        d = tmp_path / "projections" / "pca" / "all"
        d.mkdir(parents=True, exist_ok=True)
        xy = rng.normal(size=(len(rows), 2)).astype(np.float32) * 20
        pl.DataFrame({"subject_id": [r[0] for r in rows], "image_uid": [r[1] for r in rows],
                      "region": [r[2] for r in rows], "x": xy[:, 0], "y": xy[:, 1]}).write_parquet(d / f"{method}.parquet")
        paths.append(d / f"{method}.parquet")
    return tmp_path / "subjects.parquet", paths


def _decode(spec, dtype):
    return np.frombuffer(base64.b64decode(spec), dtype=dtype)


def test_map_payload_keeps_every_point_and_is_small(tmp_path):
    """The payload rebuilds each colouring's traces exactly (points, hover rows, colours) and is several times
    smaller than one Plotly figure per attribute."""
    from cohortlens.analysis.project import projection_figure, projection_with_attributes
    from cohortlens.report.maps import as_array, map_payload

    subjects, (tsne, umap) = _projection_run(tmp_path)
    frame, specs = projection_with_attributes(tsne, subjects)
    figs = {a: projection_figure(frame, a, s, hover_attributes=list(specs), title=a) for a, s in specs.items()}
    coords = {"tsne": frame.select("x", "y").to_numpy(),
              "umap": frame.select("image_uid").join(pl.read_parquet(umap), on="image_uid", how="left",
                                                     maintain_order="left").select("x", "y").to_numpy()}
    payload, template = map_payload(figs, coords, {"tsne": "t", "umap": "u"}, {"age": "years"})
    n = frame.height
    X = {m: (_decode(payload["xy"][m][0], np.float32), _decode(payload["xy"][m][1], np.float32)) for m in coords}
    cols = [c if isinstance(c, list) else [c["v"][k] for k in c["c"]] for c in payload["cols"]]
    hover = [list(r) for r in zip(*cols)]
    for attribute, fig in figs.items():
        original = json.loads(fig.to_json())["data"]
        traces = payload["figs"][attribute]["traces"]
        assert len(traces) == len(original)
        for t, o in zip(traces, original):
            idx = _decode(t["i"], np.uint16)
            assert np.array_equal(X["tsne"][0][idx], as_array(o["x"]).astype(np.float32))
            assert np.array_equal(X["tsne"][1][idx], as_array(o["y"]).astype(np.float32))
            assert [hover[i] for i in idx] == [list(map(str, r)) for r in o["customdata"]]
            assert t["name"] == o["name"]
    # UMAP: the same image's coordinates, found by its id
    by_uid = dict(zip(pl.read_parquet(umap)["image_uid"], pl.read_parquet(umap).select("x", "y").rows()))
    for i in range(0, n, 7):  # hover rows start with the subject id and the region
        uid = f"{hover[i][0]}/{hover[i][1]}"
        assert np.allclose((X["umap"][0][i], X["umap"][1][i]), by_uid[uid])
    assert "years" in payload["hover"] and template
    old = sum(len(f.to_json()) for f in figs.values())
    new = len(json.dumps(payload))
    assert new < old / 2.5, (new, old)  # and the payload holds UMAP too; 7 colourings in the demo: ~7x


def test_projections_section_draws_one_map_per_region_with_both_methods(tmp_path):
    from cohortlens.report.projections import projections_section
    from cohortlens.report.sections import settings

    subjects, paths = _projection_run(tmp_path)
    page, n = projections_section(paths, [], subjects, None, settings(None), attribute_units(None))
    assert n == 1 and page.count("class='cl-map'") == 1 and "proj-pca-all-tsne" in page
    assert "class='attr-select'" in page and "class='method-select'" in page and "UMAP" in page
    assert page.count("id='cl-plotly-template'") == 1 and "Plotly.newPlot" in page
    # 600 points, 4 colourings (region, sex, age, site), 2 methods: well under 150 bytes a point
    assert len(page) < 150 * 600, len(page)


def test_images_are_compacted_without_changing_a_pixel(tmp_path):
    from PIL import Image

    from cohortlens.report.fragments import compact_image

    rng = np.random.default_rng(0)
    grey = np.repeat(np.repeat(rng.integers(0, 255, (64, 64), dtype=np.uint8), 4, 0), 4, 1)
    rgb = np.stack([grey, grey // 2, 255 - grey], -1)  # > 256 colours
    for array in (np.stack([grey] * 3, -1), rgb):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        for webp in (False, True):
            data, mime = compact_image(buf.getvalue(), webp=webp)
            back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert np.array_equal(back, array if array.ndim == 3 else np.stack([array] * 3, -1)), (mime, webp)
            assert len(data) <= len(buf.getvalue())
            assert mime == "image/png" or webp
    small, _ = compact_image(buf.getvalue(), width=128)
    assert Image.open(io.BytesIO(small)).width == 128


# ------------------------------------------------------------------------------------------- findings section

def test_findings_section_states_each_finding_and_folds_its_echoes(tmp_path):
    from cohortlens.report.findings import findings_section, summary_section
    from cohortlens.report.sections import settings

    leak = _row("attribute_leak", "site", "Essen", 0.35, "balanced_accuracy_minus_chance",
                details={"balanced_accuracy": 0.55, "chance": 0.2, "survives_conditioning": ["age"]})
    echo = _row("attribute_leak", "weight", None, 0.3, explained_by="site=Essen",
                details={"explained_by": {"attribute": "site", "value": "Essen", "p_conditional": 0.43}})
    subgroup = HEADLINES[11][0]
    outlier = {**HEADLINES[12][0], "sample_ids": ["S00001/neck"]}
    pl.DataFrame([leak, echo, subgroup, outlier]).write_parquet(tmp_path / "pca.parquet")
    cfg = settings(None)
    page = findings_section([tmp_path / "pca.parquet"], [], [], cfg)
    reveal, subjects, quality = (page.index(f"<h4>{t}</h4>") for t in (
        "What the images reveal", "Subjects who look like another category", "Data quality"))
    assert reveal < subjects < quality
    card = page[page.index("Site is recognisable in the neck images"):subjects]
    assert "Survives conditioning on age" in card and "explains 1 echo" in card
    assert "Weight is recognisable in the neck images" in card and "Explained by site Essen: given site, p = 0.43" in card
    assert "Images: S00001/neck" in page and "class='findings'" in page  # the tables follow, folded
    # how many may be chance: α × the tested findings (the echo included), the cleanlab flag is not a test
    assert "up to about 0.2 of the 3 tested findings may be chance; the data-quality flag is not a test" in page
    from cohortlens.io.tables import write_parquet
    write_parquet(pl.read_parquet(tmp_path / "pca.parquet"), tmp_path / "lax/vae.parquet", metadata={"alpha": 0.2})
    lax = findings_section([tmp_path / "lax/vae.parquet"], [], [], cfg)  # α is the one discover used
    assert "At α = 0.2, up to about 0.6 of the 3 tested findings" in lax
    summary = summary_section([tmp_path / "pca.parquet"], cfg)
    assert "href='#f-pca-attribute_leak-neck-site'" in summary and "id='f-pca-attribute_leak-neck-site'" in page
    assert "Weight is recognisable" not in summary  # echoes are folded under their cause, not listed
    # the publication page: small counts of a headline as "< k", no image ids
    public = findings_section([tmp_path / "pca.parquet"], [], [], cfg, publication=True, ids={"S00001"})
    assert "(&lt; 10 subjects in ≥ 2 regions)" in public and "&lt; 10 of 300 neck images is an outlier" in public
    assert "S00001" not in public
    assert "&lt; 10 subjects" in summary_section([tmp_path / "pca.parquet"], cfg, publication=True, ids={"S00001"})
