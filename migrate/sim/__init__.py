"""The simulated VM and the local harness: guestsim, the deterministic RAM
image it verifies against, running the agents as local processes, `migrate demo`."""
