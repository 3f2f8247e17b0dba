"""What every stage and the executor share: the stage contract, the run's inputs, the run folder, fingerprints,
progress and the executor itself. Nothing here imports a stage, a backend or Ray."""
