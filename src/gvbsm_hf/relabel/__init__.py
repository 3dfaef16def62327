"""The relabel stage: ``config`` (its options), ``engine`` (the work, usable without the pipeline:
``build_ensemble``, ``relabel_stored``), ``views`` (drawing and replaying the stored views), ``store``
(``StoredSoftLabels`` and its safetensors file), ``tables`` (their ``datasets`` table, the export's
``views`` config), ``stage`` (caching and orchestration)."""
