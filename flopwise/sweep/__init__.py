"""IsoFLOP sweeps: design, run store, local pool / Ray runner."""
