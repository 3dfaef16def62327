"""The export stage: ``config`` (its options), ``engine`` (write the folder), ``card`` (its dataset card),
``loading`` (read an export back), ``push`` (to the Hub), ``layout`` (its file names), ``stage`` (caching
and orchestration); all but ``stage`` usable without the pipeline."""
