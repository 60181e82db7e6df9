"""The ground floor: configuration, errors, the cache root, atomic writes, CPU threads, device
and precision. Imports nothing else of resfit's, and `config`/`errors` import no torch.
"""
