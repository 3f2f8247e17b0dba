"""Commands built on a run folder that are not stages: ``mlcseg ablate`` and the Ray Jobs client."""
