"""The runner: the legacy post-process admin, run once inside every reduction Job.

``python -m autoreduce_runner`` reads the run's message from a mounted file, runs
the user's ``reduce.py`` in a supervised child process and posts exactly one outcome
(plus ReductionStarted). See runner-image/README.md for settings and exit codes.
"""
