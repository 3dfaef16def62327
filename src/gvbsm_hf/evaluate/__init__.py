"""The evaluate stage (docs/method.md Eq. 11): ``config`` (its options), ``datasets`` (what the student
trains and is scored on), ``trainer`` (the student's ``transformers.Trainer``), ``callbacks`` (EMA,
exact resume), ``metrics`` (top-1), ``runs`` (students x seeds), ``reuse`` (which runs are done
already) and ``stage`` (caching and orchestration)."""
