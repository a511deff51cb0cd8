"""Trial stages placed on other machines with Dask distributed (``hailo-sweep run CONFIG --cluster ADDRESS``).

Nothing here is imported by the local sweep; ``distributed`` is imported only by the modules that talk to a scheduler,
so ``pip install hailo-sweep`` without the ``[cluster]`` extra keeps working.
"""
