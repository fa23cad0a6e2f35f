"""The suite mirrors the packages: ``tests/core`` (deqguard), ``tests/training``,
``tests/service`` (and ``tests/service/admin``), each with its own fixtures; shared helpers are
``tests/_live.py`` (the one live-server helper), ``tests/_toys.py`` and
``tests/_virtual_time.py``."""
