"""The files here are rank scripts launched by ``tests/test_mpi.py`` under
mpiexec, not test modules: keep pytest (and ``--doctest-modules``) from
importing them in the test process."""

collect_ignore_glob = ["*.py"]
