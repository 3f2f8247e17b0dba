"""One module per stage. A stage imports from ``core``, ``formats``, ``ops`` and ``models``, never from another
stage (tests/test_layout.py checks it)."""
