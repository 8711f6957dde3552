# The embedded demo cohort: only defined when the config has a `demo` section.
if "demo" in config:

    rule demo_cohort:
        output:
            manifest=os.path.join(config["demo"]["out_dir"], "manifest.csv"),
            ground_truth=os.path.join(config["demo"]["out_dir"], "ground_truth.json"),
        log:
            "results/logs/demo_cohort.log",
        conda:
            ENV
        threads: config["demo"].get("workers", 2)
        resources:
            mem_mb=res("demo_cohort", "mem_mb", 4000),
            runtime=res("demo_cohort", "runtime", 60),
        params:
            demo=config["demo"],
        script:
            "../scripts/demo_cohort.py"
