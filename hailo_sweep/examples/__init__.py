"""Shipped, self-contained examples: a digits data set and the small CNN trained on it.

They give the test suite and new users a real, trained two-output model and real data without any download.
"""
