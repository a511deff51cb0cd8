"""Commands that combine the library's layers for one CLI verb (``diagnose``, ``verify``).

They sit above everything else: they read a finished sweep (``selection``), run stages again (``pipeline``) and report.
No library module imports them; only ``cli`` does.
"""
