"""The record stage: ``config`` (its options), ``engine`` (the recording pass), ``statistics_file``
(:class:`TeacherStatistics`, safetensors files, ``datasets`` tables), ``stage`` (caching and
orchestration); all but ``stage`` usable without the pipeline."""
