"""What methods see of the tissue: patches defined in microns, lattice neighbourhoods, encoders and a
feature cache (METHODS.md §1.2, §3, §6, §7.1, §8.1)."""
