"""streamproc's own QA suites, outside the package: the crash suite (:mod:`qa.chaos`), the
fault matrix (:mod:`qa.matrix`) and their harness (:mod:`qa.harness`). Run them from the
repository's root (``python -m qa.chaos``, ``python -m qa.matrix``); ``make test`` runs their
short forms."""
