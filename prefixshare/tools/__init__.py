"""The ``prefixshare`` command line and what only it uses: ``bench`` (throughput and memory, side by side),
``stats`` (dataset token counts and ideal speedups) and the machine description written into results.

Not part of the library's API: nothing in :mod:`prefixshare` imports from here.
"""
