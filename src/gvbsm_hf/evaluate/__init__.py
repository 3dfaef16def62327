"""The evaluate stage: ``config`` (its options), ``engine`` (the work, usable without the pipeline), ``stage`` (caching and orchestration)."""
