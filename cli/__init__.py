"""The ``edgeff`` command line (installed as ``edgeff.cli``)."""
