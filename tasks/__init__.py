"""Pipeline stages, with the rooms they use (training/, track/, use/, runners/). Each top-level stage module is
one stage: a plain function (used by the CLI that DVC calls) wrapped as a Prefect task (used by the flows). Both run exactly the same code."""
