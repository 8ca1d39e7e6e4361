"""Helpers shared by the tests: scratch repositories and subprocess runs (``helpers``), real local
services (``services``), tiny models per method (``method_cases``) and per adapter kind
(``adapter_cases``), and the scripts some tests run as subprocesses (``fault_inject``,
``promote_worker``). ``tests`` is on pytest's ``pythonpath``: import them as ``support.helpers``."""
