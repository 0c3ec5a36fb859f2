"""Social Learning (Mohtashami et al. 2023): teachers share instructions or synthetic examples."""
