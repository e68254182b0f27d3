"""Generators of the embedded corpus's question/answer domains (``arithmetic``, ``chemistry``).

Used by ``scripts/build_corpus.py`` only: they are not part of the installed ``mixsel`` package,
which keeps just the answer checking (:mod:`mixsel.answers`) that evaluation needs.
"""
