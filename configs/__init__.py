"""llmtrain's Hydra configs as a package: Hydra's pkg://llmtrain.configs needs this file to list it."""
