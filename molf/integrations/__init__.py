"""Integrations with training frameworks (imported on demand: `molf.integrations.hf`)."""


def check_transformers() -> None:
    """ImportError for a transformers before 5: under 4.57 (the last 4.x; trl 1.0, accelerate 1.4) the suite failed
    in 34 tests (checkpoints, resume, trl's references); molf is tested from 5.17, pyproject's floor. Reads the
    version alone (transformers' top level imports none of its models or optional packages)."""
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"molf's Trainer integration needs transformers >= 5.17, found {transformers.__version__}: "
                          "pip install -U 'transformers>=5.17', or pip install -U 'molf[train]'")
