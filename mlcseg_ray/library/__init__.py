"""The library floor: what stages, the CLI, tools and benchmarks share above ops/, formats/ and models/ (the
clustering levels, evaluation, the report), never importing a stage."""
