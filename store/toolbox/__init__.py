"""The toolbox every stage shares, knowing nothing about models or stores: one-line errors, file systems with
atomic writes (local and fsspec), the registry helper, progress, run identities, compute settings (ranks,
AMP), seeded label-preserving augmentation, and the version."""
