"""MedMNIST data: catalog, files, synthetic writer, prompts, negatives, the DataModule."""
